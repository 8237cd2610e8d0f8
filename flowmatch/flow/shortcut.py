"""Shortcut models (Frans et al. 2024): one model for every step size, taught by its own two half steps.

Conventions: the model's second input is the step, as the interval [r, t] with r = t - D (so the MMDiT embeds
D = t - r, the same input MeanFlow uses), and its output u is the average velocity of that step on our path
(t = 0 data, t = 1 noise): ``x_r = x_t - (t - r) u(x_t, t, r)``. The paper writes the same update with t = 0 noise
as ``x_{t + d} = x_t + d s(x_t, t, d)``.

Each micro batch splits in two (the paper's 3:1):
- flow matching rows, r = t (step 0): the target is the velocity v (noise - x0, or a guided / teacher one);
- self-consistency rows: a step D = 2^-k, k uniform in 0 .. levels - 1, at t uniform on the grid D, 2D, .., 1,
  with the target the stop-gradient average of two half steps of the model itself:

      u1 = u(x_t, t, t - D/2),  x_m = x_t - D/2 u1,  u2 = u(x_m, t - D/2, t - D),  target = (u1 + u2) / 2.

  Half steps of the finest size 2^-levels are taken with the instantaneous velocity (r = t), which anchors the
  chain of step sizes to the flow-matching rows (the paper trains its finest step on flow matching likewise).
No JVP is needed, so fused attention and ZeRO-3 work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.flow.path import expand_time

__all__ = ["ShortcutConfig", "bootstrap_target", "consistency_times"]


@dataclass
class ShortcutConfig:
    """The recipe's ``flow.shortcut`` section (used when ``flow.objective: shortcut``)."""

    consistency_fraction: float = 0.25
    """Fraction of each micro batch given self-consistency targets (the paper's 1/4); the rest is flow matching."""
    levels: int = 7
    """Step sizes 1, 1/2, .., 2^-(levels - 1) are trained; the finest half step is 2^-levels (the paper's 1/128)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.consistency_fraction <= 1.0:
            raise ValueError(f"flow.shortcut.consistency_fraction must be in [0, 1]; got {self.consistency_fraction}")
        if not (isinstance(self.levels, int) and 1 <= self.levels <= 20):
            raise ValueError(f"flow.shortcut.levels must be an integer in [1, 20]; got {self.levels!r}")


def consistency_times(n: int, levels: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(t, r) (n,) float32 for ``n`` self-consistency rows: step D = t - r = 2^-k, k uniform in 0..levels-1, and t
    uniform on D, 2D, .., 1 (so r >= 0)."""
    device = generator.device if generator is not None else "cpu"
    k = torch.randint(0, levels, (n,), generator=generator, device=device)
    step = torch.pow(2.0, -k.double())
    sections = torch.pow(2.0, k.double())  # grid points D, 2D, .., 1
    j = torch.floor(torch.rand(n, generator=generator, device=device, dtype=torch.float64) * sections) + 1
    t = (j * step).clamp(max=1.0)
    return t.float(), (t - step).float()


def bootstrap_target(u: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, t: Tensor, r: Tensor, *,
                     levels: int) -> Tensor:
    """The self-consistency target for the step [r, t]: two half steps of ``u(x, t, r)``, averaged; detached.

    x (B, ...), t, r (B,) -> (B, ...). Half steps of the finest size 2^-levels query u at r = t.
    """
    half = (t - r) / 2
    mid = t - half
    finest = half <= 2.0 ** -levels * (1 + 1e-4)
    with torch.no_grad():
        u1 = u(x, t, torch.where(finest, t, mid)).float()
        x_mid = x - expand_time(half, x) * u1
        u2 = u(x_mid, mid, torch.where(finest, mid, r)).float()
    return ((u1 + u2) / 2).detach()
