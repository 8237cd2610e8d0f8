"""Block swap, applied from outside the model (like :mod:`.parallelize`): the frozen weights of the last
``count`` transformer blocks live in CPU memory and are copied to the device just before each block runs, then
dropped from the device after it, so one GPU holds only a few blocks of a frozen base at a time (a LoRA run on a
model larger than the card). Trainable tensors (the adapters) stay on the device, where the optimizer has them.

On CUDA the copy of the next swapped block starts on a side stream while the current block computes (pinned CPU
memory, ``non_blocking``), and a block waits for its own copy before it runs. "Next" follows the order the blocks
run in: up in the forward, down in checkpointing's recomputation (backward), so at most two swapped blocks are on
the device at once (a copy made for the wrong direction would stay there until its block next runs). Under
activation checkpointing the recomputation in backward runs the block's (wrapped) forward again, which copies it in
again; without checkpointing autograd keeps the device copies its backward needs alive until then (the weights a
matmul keeps for its input's gradient: little is saved at the peak).

The swapped weights never sit on the device all at once, not even at start: whatever moves or casts the whole
model (the engine's initialisation) runs inside :func:`held_on_host`, where they are empty stand-ins.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Marks a swapped block with its BlockSwap (as parallelize marks checkpointed blocks).
_SWAPPED = "_flowmatch_block_swap"


def _pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin else t


@dataclass
class _Resident:
    """The frozen tensors of one block: where each lives in the block, and its CPU copy."""

    slots: list[tuple[nn.Module, str, bool]]  # (owning module, attribute name, is a parameter)
    cpu: list[torch.Tensor]
    ready: torch.cuda.Event | None = None  # the side-stream copy in flight, on CUDA
    staged: list[torch.Tensor] = field(default_factory=list)


class BlockSwap:
    """The swapping forwards of :func:`apply_block_swap` and their counters.

    Attributes:
        moves_in: block copies made to the device (one per swapped block per forward, recomputations included).
        moves_out: blocks dropped from the device after their forward.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        self.device = torch.device(device)
        self.moves_in = self.moves_out = 0
        self._blocks = blocks
        self._last = -1  # the swapped block entered last: the direction the blocks run in
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._resident = [self._take(block) for block in blocks]
        # The forward itself is wrapped, not hooked: activation checkpointing's recomputation calls the block's
        # forward function directly, past any module hook, and must find the weights on the device too.
        self._forwards = [block.forward for block in blocks]
        for i, block in enumerate(blocks):
            block.forward = functools.partial(self._run, i)
            setattr(block, _SWAPPED, self)

    def _run(self, i: int, *args: Any, **kwargs: Any) -> Any:
        self._enter(i)
        try:
            return self._forwards[i](*args, **kwargs)
        finally:
            self._leave(i)

    @contextmanager
    def held_on_host(self) -> Iterator[None]:
        """While open, each swapped tensor is an empty stand-in in its block, so whatever moves or casts the whole
        model (DeepSpeed's initialisation: ``module.to(device)``, then bf16/fp16) never copies the swapped blocks
        to the device; on exit each CPU copy takes the dtype its stand-in was cast to and goes back in place."""
        stand_ins = [[torch.empty(0, dtype=t.dtype) for t in resident.cpu] for resident in self._resident]
        for resident, empties in zip(self._resident, stand_ins):
            self._place(resident, empties)
        try:
            yield
        finally:
            pin = self._stream is not None
            for resident in self._resident:
                cast = [self._slot(slot).dtype for slot in resident.slots]
                resident.cpu = [t if t.dtype == dtype else _pinned(t.to(dtype), pin)
                                for t, dtype in zip(resident.cpu, cast)]
                for (module, name, is_param), host in zip(resident.slots, resident.cpu):
                    if is_param and not torch._has_compatible_shallow_copy_type(module._parameters[name], host):
                        # a stand-in moved to a device whose tensors cannot take CPU data in place (meta)
                        module._parameters[name] = nn.Parameter(host, requires_grad=False)
                self._place(resident, resident.cpu)

    @staticmethod
    def _slot(slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
        module, name, is_param = slot
        return module._parameters[name] if is_param else module._buffers[name]

    def _take(self, block: nn.Module) -> _Resident:
        """Move ``block``'s frozen parameters and its buffers to (pinned) CPU memory."""
        slots, cpu = [], []
        pin = self._stream is not None
        for module in block.modules():
            tensors = [(name, p, True) for name, p in module._parameters.items()
                       if p is not None and not p.requires_grad]
            tensors += [(name, b, False) for name, b in module._buffers.items() if b is not None]
            for name, tensor, is_param in tensors:
                host = _pinned(tensor.detach().to("cpu", copy=True), pin)
                slots.append((module, name, is_param))
                cpu.append(host)
        resident = _Resident(slots, cpu)
        self._place(resident, cpu)
        return resident

    @staticmethod
    def _place(resident: _Resident, tensors: list[torch.Tensor]) -> None:
        for (module, name, is_param), tensor in zip(resident.slots, tensors):
            if is_param:
                module._parameters[name].data = tensor
            else:
                module._buffers[name] = tensor

    def _copy(self, i: int) -> None:
        """Start copying block ``i`` to the device (on the side stream on CUDA)."""
        resident = self._resident[i]
        if resident.staged:
            return
        if self._stream is None:
            resident.staged = [t.to(self.device, copy=True) for t in resident.cpu]  # a real copy on CPU too
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            resident.staged = [t.to(self.device, non_blocking=True) for t in resident.cpu]
            resident.ready = torch.cuda.Event()
            resident.ready.record(self._stream)

    def _enter(self, i: int) -> None:
        self._copy(i)
        resident = self._resident[i]
        if resident.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(resident.ready)
            for t in resident.staged:  # used on the compute stream now: not to be reused before it is done
                t.record_stream(torch.cuda.current_stream(self.device))
            resident.ready = None
        self._place(resident, resident.staged)
        self.moves_in += 1
        # Ahead of use, while block i computes: the block below when the recomputation walks down, else the one
        # above (the first block, at the bottom, prefetches the next forward's second).
        ahead = i - 1 if 0 < i < self._last else i + 1
        self._last = i
        if ahead < len(self._resident):
            self._copy(ahead)

    def _leave(self, i: int) -> None:
        resident = self._resident[i]
        self._place(resident, resident.cpu)
        resident.staged = []
        self.moves_out += 1

    def remove(self) -> None:
        """Restore the blocks' own forwards; the swapped tensors stay in CPU memory."""
        for block, forward in zip(self._blocks, self._forwards):
            block.forward = forward
            delattr(block, _SWAPPED)


def apply_block_swap(blocks: list[nn.Module], count: int, device: torch.device | str) -> BlockSwap:
    """Keep the frozen weights of the last ``count`` of ``blocks`` (execution order, e.g. ``model.blocks()``) in
    CPU memory and stream them to ``device`` ahead of use; returns the :class:`BlockSwap`. Apply before
    activation checkpointing (whose recomputation must run the swapping forward), and move the model to the device
    inside :func:`held_on_host`."""
    if not 0 < count <= len(blocks):
        raise ValueError(f"block swap count must be in 1..{len(blocks)} (the model's blocks), got {count}")
    return BlockSwap(blocks[len(blocks) - count:], torch.device(device))


@contextmanager
def held_on_host(blocks: list[nn.Module]) -> Iterator[None]:
    """:meth:`BlockSwap.held_on_host` of the swap applied to ``blocks``, if any: open it around whatever moves or
    casts the whole model."""
    swaps = list({id(s): s for s in (getattr(b, _SWAPPED, None) for b in blocks) if s is not None}.values())
    with ExitStack() as stack:
        for swap in swaps:
            stack.enter_context(swap.held_on_host())
        yield
