"""ODE samplers: integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data).

Fixed-step solvers walk the grid ``t_i = shift_time(1 - i / N, shift)``, i = 0..N (the same grid
:meth:`flowmatch.flow.TimeSchedule.sampling_grid` returns), and live in :data:`FIXED_STEP_SOLVERS`: adding one is
one function plus one entry. They are written here rather than taken from torchdiffeq because sampling needs an
exact evaluation count per step, a multistep data-prediction solver torchdiffeq lacks, and the flow's own time
grid. Adaptive methods (``dopri5`` and torchdiffeq's other error-controlled methods) go through
``torchdiffeq.odeint``.

Solvers should be compared at equal numbers of velocity evaluations (NFE), not equal steps: see
:func:`steps_for_nfe` and :attr:`ODESolution.nfe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.flow.timesteps import check_steps, shifted_grid

__all__ = [
    "ADAPTIVE_SOLVERS",
    "AVERAGE_SOLVER",
    "FIXED_STEP_SOLVERS",
    "FixedStepSolver",
    "ODESolution",
    "SOLVERS",
    "Velocity",
    "available_solvers",
    "jumps_with_average",
    "nfe_per_step",
    "sample_ode",
    "solver_order",
    "steps_for_nfe",
]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""A velocity field ``velocity(x, t)``: x (B, ...), t (B,) of x's dtype -> (B, ...)."""

# torchdiffeq's methods with error control; its fixed-grid methods are covered by FIXED_STEP_SOLVERS.
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass(frozen=True)
class ODESolution:
    """Result of :func:`sample_ode`."""

    x: Tensor
    """(B, ...) the sample at t = 0, same shape and dtype as the noise."""
    nfe: int
    """Number of velocity evaluations made (each is one batched forward of the model)."""


class _Field:
    """Wraps a velocity callable: counts evaluations and passes t as a (B,) tensor of x's dtype and device."""

    def __init__(self, velocity: Velocity) -> None:
        self.velocity = velocity
        self.nfe = 0

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        self.nfe += 1
        if isinstance(t, Tensor):
            tb = t.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        else:
            tb = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        return self.velocity(x, tb)


def _euler(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * f(x, t)
    return x


def _heun(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    # Trapezoidal corrector on every step, the last one included: unlike an EDM-style denoiser, the velocity is
    # well defined at t = 0, so no Euler fallback is needed and each step costs exactly two evaluations.
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)
        k2 = f(x + h * k1, t_next)
        x = x + 0.5 * h * (k1 + k2)
    return x


def _midpoint(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)
        x = x + h * f(x + 0.5 * h * k1, t + 0.5 * h)
    return x


def _rk4(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _half_log_snr(t: float) -> float:
    """lambda(t) = log(alpha / sigma) = log((1 - t) / t) on our path; -inf at t = 1 (noise), +inf at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log1p(-t) - math.log(t)


def _dpmpp_2m(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) written for the path alpha_t = 1 - t, sigma_t = t.

    The exponential-integrator step from s to t with data prediction D = x0_hat is
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D`` with h = lambda_t - lambda_s; on this path
    ``-alpha_t (e^{-h} - 1) = 1 - t / s``, so ``x_t = (t / s) x_s + (1 - t / s) D`` (the first-order step is
    exactly Euler). The second-order multistep correction replaces D by
    ``(1 + 1 / (2r)) D_i - 1 / (2r) D_{i-1}`` with r = h_{i-1} / h_i. lambda is infinite at t = 1 and t = 0, so
    the first step (no history), the step after it (h_{i-1} infinite: the correction vanishes) and the last step
    to t = 0 (h_i infinite) are first order; a bounded number of first-order steps keeps global order two.

    On a grid uniform in t the steps in lambda near both ends are O(1) rather than O(h), and the error is
    O(h^2 log(1/h)) instead of O(h^2): the observed order creeps up to 2 (about 1.75 at 64-128 steps).
    """
    d_prev: Tensor | None = None
    h_prev = math.inf
    for s, t in zip(grid[:-1], grid[1:]):
        d = x - s * f(x, s)  # x0 prediction, flowmatch.flow.x0_from_velocity
        h = _half_log_snr(t) - _half_log_snr(s)
        d_eff = d
        if d_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            c = h / (2.0 * h_prev)  # 1 / (2r)
            d_eff = (1.0 + c) * d - c * d_prev
        x = (t / s) * x + (1.0 - t / s) * d_eff
        d_prev, h_prev = d, h
    return x


def _ab2(f: _Field, x: Tensor, grid: Sequence[float]) -> Tensor:
    """Two-step Adams-Bashforth on the velocity, with variable steps; the first step is Euler.

    Extrapolates v linearly in t from the last two evaluations:
    ``x_{i+1} = x_i + h_i ((1 + c) v_i - c v_{i-1})`` with c = h_i / (2 h_{i-1}). One evaluation per step.
    """
    v_prev: Tensor | None = None
    h_prev = 0.0
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        v = f(x, t)
        if v_prev is None:
            x = x + h * v
        else:
            c = h / (2.0 * h_prev)
            x = x + h * ((1.0 + c) * v - c * v_prev)
        v_prev, h_prev = v, h
    return x


@dataclass(frozen=True)
class FixedStepSolver:
    """A fixed-step solver: ``integrate(f, x, grid) -> x`` over the decreasing time grid, and its cost.

    ``f(x, t)`` takes the time as a Python float, makes the (B,) time tensor and counts the evaluation, so a new
    solver is one such function plus one :data:`FIXED_STEP_SOLVERS` entry.
    """

    integrate: Callable[[_Field, Tensor, Sequence[float]], Tensor]
    """Walks ``grid`` (Python floats from 1 to 0) from ``x`` at grid[0], returns x at grid[-1]."""
    order: int
    """Global order of accuracy: error = O(h^order)."""
    nfe_per_step: int
    """Velocity evaluations per step."""


FIXED_STEP_SOLVERS: dict[str, FixedStepSolver] = {
    "euler": FixedStepSolver(_euler, order=1, nfe_per_step=1),
    "heun": FixedStepSolver(_heun, order=2, nfe_per_step=2),
    "midpoint": FixedStepSolver(_midpoint, order=2, nfe_per_step=2),
    "rk4": FixedStepSolver(_rk4, order=4, nfe_per_step=4),
    "dpm++2m": FixedStepSolver(_dpmpp_2m, order=2, nfe_per_step=1),
    "ab2": FixedStepSolver(_ab2, order=2, nfe_per_step=1),
}


# Few-step jumps of an average-velocity model (flowmatch.sampling.fewstep): a sampler name like the solvers',
# but it needs the model's second time r, so sample_ode (velocity(x, t) only) does not run it.
AVERAGE_SOLVER = "average"

SOLVERS: tuple[str, ...] = tuple(FIXED_STEP_SOLVERS) + ADAPTIVE_SOLVERS + (AVERAGE_SOLVER,)
"""Every sampler name: the fixed-step registry, torchdiffeq's adaptive methods, the few-step ``average``."""


def available_solvers() -> tuple[str, ...]:
    """Every sampler name, including solvers registered in FIXED_STEP_SOLVERS after import."""
    return tuple(FIXED_STEP_SOLVERS) + ADAPTIVE_SOLVERS + (AVERAGE_SOLVER,)


def _fixed(solver: str) -> FixedStepSolver:
    if solver in FIXED_STEP_SOLVERS:
        return FIXED_STEP_SOLVERS[solver]
    if solver in ADAPTIVE_SOLVERS:
        raise ValueError(f"solver {solver!r} is adaptive: it chooses its own steps, so it has no fixed order/NFE")
    raise _unknown(solver)


def _unknown(solver: str, key: str = "solver") -> ValueError:
    return choice_error(key, solver, available_solvers())


def check_solver(solver: str, key: str = "solver") -> str:
    """``solver`` if ``sample_ode`` accepts it, else a ValueError naming ``key``, the allowed solvers and the
    nearest spelling."""
    if solver not in available_solvers():
        raise _unknown(solver, key)
    return solver


def jumps_with_average(solver: str) -> bool:
    """Whether sampler ``solver`` jumps with the model's average velocity u(x, t, r) (the few-step ``average``)
    instead of integrating its velocity."""
    return solver == AVERAGE_SOLVER


def solver_order(solver: str) -> int:
    """Global order of a fixed-step solver (``average``: 1, Euler's on a model without the interval input)."""
    return 1 if solver == AVERAGE_SOLVER else _fixed(solver).order


def nfe_per_step(solver: str) -> int:
    """Velocity evaluations per step of a fixed-step solver (``average``: one per jump)."""
    return 1 if solver == AVERAGE_SOLVER else _fixed(solver).nfe_per_step


def steps_for_nfe(solver: str, nfe: int) -> int:
    """The most steps of ``solver`` that fit in ``nfe`` velocity evaluations (to compare solvers fairly)."""
    per_step = nfe_per_step(solver)
    if nfe < per_step:
        raise ValueError(f"{solver!r} needs at least {per_step} evaluations for one step; got nfe={nfe}")
    return nfe // per_step


def sample_ode(
    velocity: Velocity,
    noise: Tensor,
    *,
    steps: int,
    solver: str = "euler",
    shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grid: Optional[Sequence[float]] = None,
) -> ODESolution:
    """Integrate ``dx/dt = velocity(x, t)`` from ``noise`` (B, ...) at t = 1 to t = 0.

    Args:
        velocity: any callable ``velocity(x, t)``; t is (B,) in x's dtype and device.
        noise: (B, ...) starting point at t = 1.
        steps: number of steps N of a fixed-step solver (N * nfe_per_step evaluations); unused by adaptive ones.
        solver: a name in :func:`available_solvers`.
        shift: timestep shift of the fixed-step grid; pass ``TimeSchedule.shift_for(seq_len)`` so sampling uses
            the shift training used. Adaptive solvers integrate t continuously and ignore it.
        rtol, atol: tolerances of adaptive solvers.
        grid: the ``steps + 1`` times of a fixed-step solver, from 1 down to 0, instead of the shifted grid (e.g. a
            diffusers scheduler's sigmas: :func:`flowmatch.sampling.diffusers_schedule.pipeline_grid`).

    Gradients are not disabled here: wrap the call in ``torch.inference_mode()`` when sampling.
    """
    steps = check_steps(steps)
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor; got dtype {noise.dtype}")
    field = _Field(velocity)
    if solver in FIXED_STEP_SOLVERS:
        if grid is None:
            grid = shifted_grid(steps, shift).tolist()
        elif len(grid) != steps + 1:
            raise ValueError(f"a grid for {steps} steps has {steps + 1} times, got {len(grid)}")
        x = FIXED_STEP_SOLVERS[solver].integrate(field, noise, [float(t) for t in grid])
    elif solver == AVERAGE_SOLVER:
        raise ValueError("solver 'average' jumps with a model's average velocity u(x, t, r): use "
                         "flowmatch.sampling.sample_average (Pipeline.generate does)")
    elif solver in ADAPTIVE_SOLVERS:
        if grid is not None:
            raise ValueError(f"solver {solver!r} chooses its own steps: a grid needs a fixed-step solver")
        from torchdiffeq import odeint  # reason: start-up cost (it loads scipy: ~0.5 s of CPU per process)

        span = torch.tensor([1.0, 0.0], dtype=noise.dtype, device=noise.device)
        x = odeint(lambda t, y: field(y, t), noise, span, rtol=rtol, atol=atol, method=solver)[-1]
    else:
        raise _unknown(solver)
    return ODESolution(x=x, nfe=field.nfe)
