"""The optimizers a recipe may name (``optim.name``), each able to skip its next step, and the fused-backward
wrapper that applies each parameter's update inside backward.

=============  =======================================================  ===========================================
name           implementation                                           state per trainable parameter
=============  =======================================================  ===========================================
``adamw``      torch AdamW (fused kernel where available)               two fp32 moments: 8 bytes
``adamw8bit``  bitsandbytes ``AdamW8bit`` (block-wise 8-bit moments;    two uint8 moments + one fp32 scale per 256
               tensors under 4096 elements keep fp32 moments)           values each: ~2 bytes
``adafactor``  torch ``Adafactor`` (factored second moment, no first)   one row and one column vector per matrix
=============  =======================================================  ===========================================

Every optimizer's state is plain tensors and numbers, so :meth:`~flowmatch.engine.trainable.Trainable.optimizer_state`
writes it with safetensors and JSON and a resume is bit-identical; none is pickled. bitsandbytes is the 8-bit
backend (not torchao's low-bit AdamW) because its state is plain ``uint8``/``float32`` tensors that safetensors
writes as they are, and its step needs no compilation (torchao's compiles its step on first use, seconds on CPU).

**Fused backward** (``optim.fused_backward``): :class:`FusedBackward` gives every trainable parameter its own
optimizer of the chosen kind and steps it from the parameter's ``register_post_accumulate_grad_hook``, then frees
its gradient, so at most one parameter's gradient is alive at a time after accumulation. It needs every gradient
of the window final when its hook fires, which ZeRO (gradients reduced or partitioned after backward) and data
parallelism (gradients all-reduced after backward) do not give, and it cannot clip by the global norm (no moment
holds every gradient): the engine refuses those combinations by name.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Package of each optimizer's backend that is not torch itself: a recipe naming the optimizer needs it installed.
BACKENDS: dict[str, str] = {"adamw8bit": "bitsandbytes"}
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adafactor")


def missing_backend(name: str) -> str | None:
    """The package optimizer ``name`` needs that is not installed here, or None."""
    package = BACKENDS.get(name)
    return package if package is not None and importlib.util.find_spec(package) is None else None


class Skippable:
    """Mixin for a torch optimizer whose next ``step()`` becomes a no-op while ``overflow`` is set.

    DeepSpeed reads ``overflow`` from an unwrapped optimizer (ZeRO stage 0, fp32) to skip the scheduler and count a
    skipped step; under ZeRO wrappers the flag is a second guard that the inner update never runs.
    """

    overflow = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.overflow:
            return None
        return super().step(closure)  # type: ignore[misc]


@functools.cache
def skippable(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` with :class:`Skippable`'s ``overflow`` flag (one class per optimizer class)."""
    return type(f"Skippable{cls.__name__}", (Skippable, cls), {})


def _adamw(params: list[Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
           implementation: dict[str, bool]) -> torch.optim.Optimizer:
    return skippable(torch.optim.AdamW)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        **implementation)


def _adamw8bit(params: list[Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               implementation: dict[str, bool]) -> torch.optim.Optimizer:
    import bitsandbytes  # optional heavy dependency, only for optim.name: adamw8bit

    return skippable(bitsandbytes.optim.AdamW8bit)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adafactor(params: list[Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               implementation: dict[str, bool]) -> torch.optim.Optimizer:
    # torch's Adafactor keeps no first moment and decays its second with its own beta2 schedule (-0.8 power of
    # the step), so optim.betas do not apply; eps is its eps1 (added to the squared gradient), eps2 its default.
    return skippable(torch.optim.Adafactor)(params, lr=lr, eps=(eps, 1e-3), weight_decay=weight_decay)


# Builders by recipe name: (params or groups, lr, betas, eps, weight_decay, AdamW implementation keywords).
_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "adafactor": _adafactor}


def build_optimizer(name: str, params: Iterable[Any], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, implementation: dict[str, bool]) -> torch.optim.Optimizer:
    """The skippable optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) over ``params`` (tensors or groups)."""
    return _BUILDERS[name](list(params), lr, tuple(betas), eps, weight_decay, implementation)


class FusedBackward(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped inside backward as soon as its gradient is final; the gradient
    is freed at once.

    The param groups, hyper-parameters and LR schedule are this object's, as for any torch optimizer (a scheduler
    drives it); its ``state`` is the one dict every per-parameter optimizer writes into, so ``state_dict()`` and
    ``load_state_dict()`` are torch's own and a checkpoint holds the same tensors as the unfused optimizer's.
    Updates happen only while :attr:`armed` (the last micro-batch of a window whose losses were all finite);
    ``step()`` itself does nothing.

    Args:
        params: parameters or param-group dicts.
        make: builds the optimizer of the chosen kind over given params or groups.
    """

    def __init__(self, params: Iterable[Any], make: Callable[[list[Any]], torch.optim.Optimizer]) -> None:
        template = make(list(params))  # normalises groups and fills in the kind's defaults; holds no state yet
        super().__init__(template.param_groups, template.defaults)
        self.armed = False
        self.overflow = False
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._hooks = []
        for index, group in enumerate(self.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                inner = make([{**hyper, "params": [p]}])
                inner.state = self.state
                self._inner[p], self._group_of[p] = inner, index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._update))

    def _update(self, p: torch.Tensor) -> None:
        if not self.armed:
            return  # an earlier micro-batch of the window: keep accumulating
        inner = self._inner[p]
        inner.param_groups[0].update({k: v for k, v in self.param_groups[self._group_of[p]].items() if k != "params"})
        inner.step()
        p.grad = None

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Nothing to do: each parameter was updated inside backward."""
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every saved state tensor to its parameter's dtype; 8-bit moments must stay uint8.
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if torch.is_tensor(value) and self.state[params[index]][key].dtype != value.dtype:
                    self.state[params[index]][key] = value.to(params[index].device)
        for inner in self._inner.values():  # torch replaced the state dict: point every parameter's at it again
            inner.state = self.state

    def remove_hooks(self) -> None:
        """Detach from the parameters (the model no longer updates itself in backward)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
