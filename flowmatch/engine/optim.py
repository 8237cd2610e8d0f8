"""The optimizer side of a run: the recipe's ``optim`` section, the learning-rate schedules, and the LambdaLR the
engine hands DeepSpeed, able to skip its next step (as the optimizers of :mod:`.optimizers` are) so that a
discarded accumulation window changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowmatch.engine.optimizers import OPTIMIZER_NAMES, missing_backend
from flowmatch.errors import choice_error


def _constant(progress: float, floor: float) -> float:
    return 1.0


def _cosine(progress: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# The schedules after warmup, by recipe name: multiplier of the peak learning rate at a progress in [0, 1] through
# the post-warmup steps, given the floor optim.min_lr_ratio. Recipes are checked against these names.
SCHEDULES: dict[str, Callable[[float, float], float]] = {"cosine": _cosine, "constant": _constant}


@dataclass
class OptimConfig:
    """The recipe's `optim` section: the optimizer, its schedule and gradient clipping."""

    name: str = "adamw"
    """adamw (torch), adamw8bit (bitsandbytes' block-wise 8-bit moments) or adafactor (torch; factored second
    moment, no first: betas do not apply)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """After warmup: cosine (decay to min_lr_ratio * lr at max_steps) or constant."""
    min_lr_ratio: float = 0.1
    """Final lr of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    fused_backward: bool = False
    """Apply each parameter's update inside backward and free its gradient at once (saves the gradients'
    memory); needs zero_stage 0 on one process and grad_clip 0."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise choice_error("name", self.name, OPTIMIZER_NAMES)
        package = missing_backend(self.name)
        if package is not None:
            raise ValueError(f"name: {self.name} needs the {package} package, which is not installed: "
                             f"pip install {package} (or choose name: adamw)")
        if self.fused_backward and self.grad_clip > 0:
            raise ValueError(f"fused_backward: true needs grad_clip: 0 (got {self.grad_clip}): each parameter is "
                             "updated as soon as its gradient is ready, so no global gradient norm exists to clip by")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, warmup_steps >= 0 and grad_clip >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate ``optim.lr`` for the update with 0-based index ``step``.

    Warmup is linear, ``(step + 1) / warmup_steps``, so the first update already moves. After warmup,
    ``constant`` stays at 1 and ``cosine`` follows a half cosine from 1 at ``step = warmup_steps`` to
    ``min_lr_ratio`` at ``step = max_steps`` (and stays there).
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return SCHEDULES[optim.schedule](progress, optim.min_lr_ratio)


def adamw_implementation(device: torch.device, *, offload: bool = False) -> dict[str, bool]:
    """torch AdamW's keyword choosing its implementation for parameters on ``device``: the fastest that computes
    the same update (fused differs from the per-tensor loop only by float rounding, ~1 ulp).

    ``fused`` (one kernel per parameter, no intermediates) is the fastest on CUDA and, since torch 2.4, on CPU
    too: over the ~10M fp32 parameters of benchmarks/mmdit_step.py's model it takes about a third of the CPU time
    of the default per-tensor loop (8-10 ms against 25-28 ms per step on one core), and ``foreach``, whose
    multi-tensor ops pay off only on accelerators, is no faster than the loop there. With DeepSpeed's optimizer
    offload the choice stays ``foreach``, as before: DeepSpeed steps it on CPU copies of the parameters, a setup
    the fused path has not been tested under here.
    """
    if offload:
        return {"foreach": True}
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class SkippableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose next ``step()`` can be skipped, so a discarded window does not advance the schedule."""

    skip_next = False

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.skip_next:
            super().step(*args, **kwargs)

    def set_position(self, steps: int) -> None:
        """Continue as if ``steps`` updates had been applied (when DeepSpeed's own scheduler state is unusable)."""
        self.last_epoch = steps
        lrs = [base * fn(steps) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
