"""The optimizer and learning-rate schedule the engine hands DeepSpeed: torch AdamW and a warmup + cosine/constant
LambdaLR, both able to skip their next step so that a discarded accumulation window changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update with 0-based index ``step``.

    Warmup is linear, ``(step + 1) / warmup_steps``, so the first update already moves. After warmup,
    ``constant`` stays at 1 and ``cosine`` follows a half cosine from 1 at ``step = warmup_steps`` to
    ``min_lr_ratio`` at ``step = max_steps`` (and stays there).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` can be made a no-op by setting ``overflow``.

    DeepSpeed reads ``overflow`` from an unwrapped optimizer (ZeRO stage 0, fp32) to skip the scheduler and
    count a skipped step; under ZeRO wrappers the flag is a second guard that the inner update never runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflow = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.overflow:
            return None
        return super().step(closure)


class SkippableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose next ``step()`` can be skipped, so a discarded window does not advance the schedule."""

    skip_next = False

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.skip_next:
            super().step(*args, **kwargs)
