"""Affine probability paths ``x_t = alpha_t x0 + sigma_t eps``: rectified flow and the variance-preserving paths of
DDPM, as one small abstraction over flowmatch's one time convention (t = 0 data, t = 1 noise; see
:mod:`flowmatch.flow.path`).

- ``rectified``: alpha = 1 - t, sigma = t (the SD3 paper's rectified flow; flowmatch's default).
- ``vp_linear``: DDPM's schedule (Ho et al. 2020): betas linear from 1e-4 to 0.02 over 1000 steps.
- ``vp_cosine``: the cosine schedule (Nichol & Dhariwal 2021): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
  betas clipped at 0.999.

The variance-preserving paths (alpha^2 + sigma^2 = 1) are built from their discrete 1000-step tables: at
t = k / 1000, alpha_t^2 is exactly the product of (1 - beta_i) for i = 1..k (Ho et al.'s alpha_bar_k, which
diffusers' ``DDPMScheduler.alphas_cumprod[k - 1]`` holds), with alpha_0 = 1. Between the knots log alpha_bar is
linear in t, i.e. the continuous-time beta(t) = -d log alpha_bar / dt is piecewise constant; this keeps t
continuous in [0, 1] (training draws any t, samplers use any grid) while every k / 1000 is the published table.
So a model's time input 1000 t is DDPM's integer timestep at the knots.

Each path gives alpha, sigma, their t-derivatives (the probability-flow velocity is
``alpha'_t x0 + sigma'_t eps``) and the log signal-to-noise ratio ``log(alpha^2 / sigma^2)``. Shapes: t is (B,)
(or any shape) and every method returns t's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.errors import choice_error

__all__ = ["AffinePath", "PATHS", "ddpm_betas", "get_path"]

#: DDPM's discrete schedule (Ho et al. 2020, section 4): T = 1000 steps, betas linear from 1e-4 to 0.02.
DDPM_STEPS = 1000
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
#: The cosine schedule's offset s = 0.008 and beta clip 0.999 (Nichol & Dhariwal 2021, section 3.2).
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def ddpm_betas(schedule: str, steps: int = DDPM_STEPS) -> Tensor:
    """The discrete betas (steps,) float64 of ``linear`` or ``cosine``, as diffusers' DDPMScheduler builds them
    (``beta_schedule="linear"`` / ``"squaredcos_cap_v2"``)."""
    if schedule == "linear":
        return torch.linspace(DDPM_BETA_START, DDPM_BETA_END, steps, dtype=torch.float64)
    if schedule == "cosine":
        s = torch.arange(steps + 1, dtype=torch.float64) / steps
        abar = torch.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=COSINE_MAX_BETA)
    raise choice_error("schedule", schedule, ("linear", "cosine"))


@dataclass(frozen=True)
class AffinePath:
    """One affine path: coefficients alpha_t, sigma_t of ``x_t = alpha_t x0 + sigma_t eps`` on t in [0, 1].

    ``log_abar`` is None for the rectified path (closed forms) or the (steps + 1,) float64 knots of
    log alpha_bar at t = k / steps for a variance-preserving one.
    """

    name: str
    log_abar: Tensor | None = None

    @property
    def variance_preserving(self) -> bool:
        return self.log_abar is not None

    def _knots(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(log alpha_bar at t, its slope d/dt on t's interval), in float64 of t's shape."""
        table = self.log_abar.to(t.device)
        n = table.shape[0] - 1
        pos = t.double().clamp(0.0, 1.0) * n
        k = pos.floor().long().clamp(max=n - 1)  # t = 1 lies on the last interval
        slope = (table[k + 1] - table[k]) * n
        return table[k] + (pos - k) * (table[k + 1] - table[k]), slope

    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t, the data coefficient: 1 at t = 0."""
        if self.log_abar is None:
            return 1 - t
        return torch.exp(0.5 * self._knots(t)[0]).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma_t, the noise coefficient: 0 at t = 0."""
        if self.log_abar is None:
            return t
        return torch.sqrt(-torch.expm1(self._knots(t)[0])).to(t.dtype)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, d alpha / dt, d sigma / dt) at t; sigma' is infinite at t = 0 on a VP path."""
        if self.log_abar is None:
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        log_abar, slope = self._knots(t)
        abar = torch.exp(log_abar)
        var = -torch.expm1(log_abar)  # sigma^2 = 1 - alpha_bar
        alpha, sigma = torch.sqrt(abar), torch.sqrt(var)
        d_alpha = 0.5 * alpha * slope
        d_sigma = -0.5 * abar * slope / sigma
        return tuple(c.to(t.dtype) for c in (alpha, sigma, d_alpha, d_sigma))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2): +inf at t = 0, decreasing in t."""
        if self.log_abar is None:
            return 2 * (torch.log1p(-t) - torch.log(t))
        log_abar = self._knots(t)[0]
        return (log_abar - torch.log(-torch.expm1(log_abar))).to(t.dtype)

    def interpolate(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``alpha_t x0 + sigma_t eps``: x0, eps (B, ...), t (B,) -> (B, ...)."""
        shape = (-1, *([1] * (x0.ndim - 1)))
        return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps


def _vp(name: str, schedule: str) -> AffinePath:
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-ddpm_betas(schedule)), 0)])
    return AffinePath(name, log_abar)


PATHS: dict[str, AffinePath] = {
    "rectified": AffinePath("rectified"),
    "vp_linear": _vp("vp_linear", "linear"),
    "vp_cosine": _vp("vp_cosine", "cosine"),
}
"""Every path ``flow.path`` may name."""


def get_path(name: str, key: str = "flow.path") -> AffinePath:
    """The path called ``name``; a ValueError naming ``key``, the allowed paths and the nearest spelling."""
    if name not in PATHS:
        raise choice_error(key, name, tuple(PATHS))
    return PATHS[name]
