"""Flow-map distillation: the average velocity of an interval taken from the teacher's own ODE solve.

With a frozen teacher (``flow.teacher``) and ``flow.teacher_steps: K > 0``, the rows of a few-step objective that
have an interval r < t (MeanFlow's interval rows, the shortcut model's self-consistency rows) regress

    u*(x_t, r, t) = (x_t - x_r) / (t - r),   x_r = the teacher's guided K-step midpoint solve from t down to r,

the average velocity the exact jump ``x_r = x_t - (t - r) u`` needs (the Lagrangian flow-map objective of Boffi
et al. 2024, "Flow map matching"; the 1-step case is Luhman & Luhman 2021's knowledge distillation). Against the
MeanFlow identity, whose target ``v - (t - r) du/dt`` uses the student's own derivative and so improves only as the
student does, this target is right from the first step, and costs teacher forwards (no backward, no JVP)
instead of a JVP: ``2 K`` guided evaluations per interval row.

Conventions are :mod:`flowmatch.flow.path`'s (t = 0 data, t = 1 noise, v = noise - x0); the solve walks K equal
steps from t to r per sample, each the midpoint rule (second order: the teacher's own discretisation error is
far below the student's at the K of a recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from flowmatch.flow.path import expand_time

__all__ = ["teacher_average_velocity"]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""``v(x (B, ...), t (B,)) -> (B, ...)``: the teacher's (guided) velocity, conditioning bound."""


def teacher_average_velocity(v: Velocity, x: Tensor, t: Tensor, r: Tensor, *, steps: int,
                             v0: Optional[Tensor] = None) -> Tensor:
    """``(x - x_r) / (t - r)`` with x_r the ``steps``-step midpoint solve of ``v`` from t to r; detached, float32.

    x (B, ...), t, r (B,) with r <= t; ``v0`` is v(x, t) when the caller has it (saves one evaluation). Where
    t - r is below 1e-6 the instantaneous velocity v(x, t) is returned (the limit), so rows with r = t are safe.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    t, r = t.float(), r.float()
    h = (r - t) / steps  # negative: the solve runs towards the data
    y = x.float()
    with torch.no_grad():
        first = v(y, t).float() if v0 is None else v0.float()
        s, k1 = t, first
        for i in range(steps):
            if i:
                k1 = v(y, s).float()
            k2 = v(y + expand_time(h / 2, y) * k1, s + h / 2).float()
            y = y + expand_time(h, y) * k2
            s = s + h
        span = t - r
        tiny = expand_time(span < 1e-6, y)
        return torch.where(tiny, first, (x.float() - y) / expand_time(span.clamp(min=1e-6), y))
