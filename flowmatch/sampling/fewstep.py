"""Few-step sampling with an average-velocity model (MeanFlow, shortcut models): jumps instead of ODE steps.

A model that predicts the average velocity u(x_t, t, r) over [r, t] moves along the grid of
:func:`flowmatch.flow.shifted_grid` in exact jumps ``x_r = x_t - (t - r) u(x_t, t, r)``: one evaluation per step,
and 1 step goes from noise (t = 1) to data (t = 0) at once. On a model without the interval input (an ordinary
flow model, which ignores r) the same walk is Euler's method, step for step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowmatch.flow.timesteps import check_steps, shifted_grid
from flowmatch.sampling.solvers import AVERAGE_SOLVER, ODESolution

__all__ = ["AVERAGE_SOLVER", "AverageVelocity", "sample_average"]

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``u(x (B, ...), t (B,), r (B,)) -> (B, ...)``: the average velocity over [r, t]."""


def sample_average(u: AverageVelocity, noise: Tensor, *, steps: int, shift: float = 1.0) -> ODESolution:
    """Walk from ``noise`` (B, ...) at t = 1 to t = 0 in ``steps`` jumps of the average velocity ``u``.

    The grid is the fixed-step solvers' (``shifted_grid(steps, shift)``); t and r reach ``u`` as (B,) tensors of
    the noise's dtype and device. Gradients are not disabled here.
    """
    steps = check_steps(steps)
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor; got dtype {noise.dtype}")
    x, b = noise, noise.shape[0]
    grid = shifted_grid(steps, shift).tolist()
    for t, r in zip(grid[:-1], grid[1:]):
        tb = torch.full((b,), t, dtype=x.dtype, device=x.device)
        rb = torch.full((b,), r, dtype=x.dtype, device=x.device)
        x = x - (t - r) * u(x, tb, rb)
    return ODESolution(x=x, nfe=steps)
