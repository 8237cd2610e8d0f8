"""Diffusion samplers for any affine path and any prediction: DDIM with eta (Song et al. 2020), DDPM's ancestral
sampler (Ho et al. 2020), and a predictor-corrector sampler with Langevin corrector steps (Song et al. 2021).

The deterministic alternative, the probability-flow ODE, needs nothing here: :meth:`Formulation.to_velocity`
turns any prediction into dx/dt and :func:`~flowmatch.sampling.sample_ode` integrates it with any solver. DDIM
(eta = 0) is the first-order solver of that same ODE in other coordinates: with y = x / alpha and rho =
sigma / alpha, the ODE is dy/drho = eps_hat, and the DDIM update ``x_s = alpha_s x0_hat + sigma_s eps_hat`` is
exactly Euler's step in (rho, y) (``tests/test_formulations.py`` checks both). On the rectified path DDIM is the
Euler solver itself.

All samplers walk the grid of :func:`~flowmatch.flow.shifted_grid` from t = 1 to t = 0 (with shift 1 and N steps
on a VP path, t = k / N: DDIM with N = 20 visits diffusers' ``timestep_spacing="trailing"`` timesteps 999, 949,
..., 49 and ends at alpha = 1). Between grid times s < t they use the forward process's transition
x_t | x_s ~ N(a x_s, v I) with a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2, whose posterior given x0 has
variance v sigma_s^2 / sigma_t^2. ``predict(x, t)`` is the (guided) model prediction of the formulation's kind;
the fresh noise of the stochastic samplers comes from ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.flow.formulation import Formulation
from flowmatch.flow.parameterization import Denoised
from flowmatch.flow.timesteps import check_steps, shifted_grid
from flowmatch.sampling.solvers import ODESolution, available_solvers

__all__ = ["DIFFUSION_SAMPLERS", "ancestral_step", "check_sampler", "ddim_step", "is_diffusion_sampler",
           "langevin_step", "sample_diffusion"]

DIFFUSION_SAMPLERS = ("ddim", "ancestral", "pc")
"""Sampler names accepted wherever an ODE solver name is (``sampling.solver``, ``eval.solvers``)."""

Prediction = Callable[[Tensor, Tensor], Tensor]
"""``predict(x (B, ...), t (B,)) -> the model's prediction (B, ...)`` (guidance already applied)."""


def is_diffusion_sampler(name: str) -> bool:
    """Whether sampler ``name`` is a diffusion sampler (it takes fresh noise and the formulation), not an ODE
    solver."""
    return name in DIFFUSION_SAMPLERS


def check_sampler(name: str, key: str = "sampling.solver") -> str:
    """``name`` if it is an ODE solver or a diffusion sampler, else a ValueError naming ``key`` and the choices."""
    allowed = (*available_solvers(), *DIFFUSION_SAMPLERS)
    if name not in allowed:
        raise choice_error(key, name, allowed)
    return name


def _coeffs(form: Formulation, t: float, x: Tensor) -> tuple[Tensor, Tensor]:
    tt = torch.tensor([t], dtype=torch.float64)
    return form.path.alpha(tt).item(), form.path.sigma(tt).item()


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    draw = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=draw, dtype=x.dtype).to(x.device)


def _posterior(form: Formulation, t: float, s: float, x: Tensor) -> tuple[float, float, float, float, float]:
    """(alpha_s, sigma_s, a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2, sigma_t) between grid times s < t."""
    a_t, s_t = _coeffs(form, t, x)
    a_s, s_s = _coeffs(form, s, x)
    a = a_t / a_s
    return a_s, s_s, a, max(s_t**2 - a**2 * s_s**2, 0.0), s_t


def ddim_step(form: Formulation, x: Tensor, d: Denoised, t: float, s: float, *, eta: float = 0.0,
              generator: torch.Generator | None = None) -> Tensor:
    """One DDIM step from t to s < t given the denoised (x0_hat, eps_hat) at (x, t):
    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with c^2 = eta^2 v sigma_s^2 / sigma_t^2."""
    a_s, s_s, _, v, s_t = _posterior(form, t, s, x)
    c2 = eta**2 * v * s_s**2 / s_t**2
    out = a_s * d.x0 + max(s_s**2 - c2, 0.0) ** 0.5 * d.eps
    return out + c2**0.5 * _noise(x, generator) if c2 > 0 else out


def ancestral_step(form: Formulation, x: Tensor, d: Denoised, t: float, s: float, *,
                   generator: torch.Generator | None = None) -> Tensor:
    """One ancestral step: a draw from the forward posterior q(x_s | x_t = x, x0 = x0_hat), Ho et al.'s eq. 7:
    mean ``(a sigma_s^2 / sigma_t^2) x + (alpha_s v / sigma_t^2) x0_hat``, variance ``v sigma_s^2 / sigma_t^2``."""
    a_s, s_s, a, v, s_t = _posterior(form, t, s, x)
    mean = (a * s_s**2 / s_t**2) * x + (a_s * v / s_t**2) * d.x0
    var = v * s_s**2 / s_t**2
    return mean + var**0.5 * _noise(x, generator) if var > 0 else mean


def langevin_step(form: Formulation, x: Tensor, d: Denoised, t: float, *, snr: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """One Langevin corrector step at time t with the score -eps_hat / sigma_t and Song et al.'s step size
    (2021, algorithm 5): 2 (snr ||z|| / ||score||)^2, the norms per example averaged over the batch as in their
    release (per-example norms of few dimensions are too noisy: a near-zero score norm makes a huge step). The
    step size therefore depends on the batch; the sample of one seed can differ between batches under ``pc``."""
    _, s_t = _coeffs(form, t, x)
    score = -d.eps / s_t
    z = _noise(x, generator)
    norm_z = z.flatten(1).norm(dim=1).mean()
    norm_g = score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
    step = 2 * (snr * norm_z / norm_g) ** 2
    return x + step * score + (2 * step).sqrt() * z


def sample_diffusion(predict: Prediction, noise: Tensor, *, formulation: Formulation, sampler: str, steps: int,
                     shift: float = 1.0, eta: float = 0.0, corrector_steps: int = 1, corrector_snr: float = 0.16,
                     clip_x0: float = 0.0, generator: torch.Generator | None = None) -> ODESolution:
    """Sample from ``noise`` (B, ...) at t = 1 down to t = 0 with ``sampler`` (ddim | ancestral | pc).

    ``pc`` is Song et al.'s predictor-corrector: at each grid time ``corrector_steps`` Langevin steps, then an
    ancestral step. ``clip_x0 > 0`` clamps the predicted data to [-clip_x0, clip_x0] and takes eps from the
    clamped x0 (Ho et al.'s sampler on [-1, 1] pixels; diffusers' ``clip_sample``): near t = 1 an eps prediction
    fixes x0 only through a division by alpha_t, which is 5e-5 at the end of the cosine schedule. Returns the
    sample and the number of model evaluations.
    """
    if sampler not in DIFFUSION_SAMPLERS:
        raise choice_error("sampler", sampler, DIFFUSION_SAMPLERS)
    grid = shifted_grid(check_steps(steps), shift).tolist()
    x, nfe = noise, 0

    def denoised(x: Tensor, t: float) -> Denoised:
        nonlocal nfe
        nfe += 1
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        d = formulation.denoise(x, predict(x, tb), tb)
        if clip_x0 > 0:
            a_t, s_t = _coeffs(formulation, t, x)
            x0 = d.x0.clamp(-clip_x0, clip_x0)
            d = Denoised(x0, (x - a_t * x0) / s_t)
        return d

    for t, s in zip(grid[:-1], grid[1:]):
        if sampler == "pc":
            for _ in range(corrector_steps):
                x = langevin_step(formulation, x, denoised(x, t), t, snr=corrector_snr, generator=generator)
        d = denoised(x, t)
        if sampler == "ddim":
            x = ddim_step(formulation, x, d, t, s, eta=eta, generator=generator)
        else:
            x = ancestral_step(formulation, x, d, t, s, generator=generator)
    return ODESolution(x=x, nfe=nfe)
