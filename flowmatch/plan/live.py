"""The most bytes alive at once while a function runs: what a step holds outside autograd's saved tensors, such
as a forward-mode JVP's tangents or the no-grad forwards that make a few-step objective's targets.

Every tensor an operator returns is recorded by its storage (views of one storage count once) until the last
tensor on that storage is freed; tensors that alias an operator's inputs made before the call (the weights, the
inputs) are not new memory and are not counted. It runs on the meta device as on the CPU: nothing is allocated
on meta, and the count is the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class LiveBytes(TorchDispatchMode):
    """A dispatch mode counting the bytes of the storages its operators made that are still referenced.

    Attributes:
        now: bytes alive now.
        peak: the most bytes alive at once since the mode was entered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage -> [tensors on it still alive, its bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {_storage(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = _storage(t)
            if key not in self._live:
                if key in given:  # a view (or in-place result) of memory made before: nothing new
                    continue
                self._live[key] = [0, nbytes]
                self.now += nbytes
            self._live[key][0] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self._live[key]


def live_peak(fn: Callable[[], Any]) -> int:
    """The most bytes ``fn()``'s own tensors hold at once (its result dropped at the end)."""
    with LiveBytes() as mode:
        fn()
    return mode.peak
