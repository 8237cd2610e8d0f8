"""Exact log-likelihood of data under a flow model, by the instantaneous change of variables.

Along the ODE dx/dt = v(x, t) the log-density changes as d log p_t(x_t) / dt = -div v(x_t, t) (Chen et al.
2018, "Neural ODEs"). Integrating from the data point x_0 at t = 0 to x_1 at t = 1, where flowmatch's path puts a
standard normal (see :mod:`flowmatch.flow.path`):

    log p_0(x_0) = log N(x_1; 0, I) + integral_0^1 div v(x_t, t) dt.

The divergence is computed exactly with one vector-Jacobian product per input dimension (batched with
``is_grads_batched``), or estimated with Hutchinson's estimator ``E[eps^T J eps] = tr J`` with Rademacher
``eps`` (Grathwohl et al. 2019, FFJORD) when the input is large. torchdiffeq integrates the pair (x, log-det).

A variance-preserving path's velocity is singular at t = 0 (sigma'_t is infinite there), so the solve starts at a
small ``t_start`` = eps instead, as Song et al. 2021 ("Score-based generative modeling through SDEs", appendix D)
do: the data point is taken as a sample of the path's marginal at t = eps, and

    log p_eps(x_0) = log N(x_1; 0, I) + integral_eps^1 div v(x_t, t) dt

is the log-density of the slightly noised data distribution p_eps (x_0 scaled by alpha_eps plus N(0, sigma_eps^2)
noise) at the data, which tends to log p_0(x_0) as eps -> 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowmatch.data.pixels import PIXEL_LEVEL_SCALE  # images from 8-bit pixels k are x = k / 127.5 - 1
from flowmatch.sampling.solvers import Velocity

__all__ = [
    "PIXEL_DATA_SCALE_CORRECTION",
    "PIXEL_LEVEL_SCALE",
    "bits_per_dim",
    "dequantize_pixels",
    "log_likelihood",
    "standard_normal_log_prob",
    "velocity_and_divergence",
    "velocity_and_trace_estimate",
]

PIXEL_DATA_SCALE_CORRECTION = math.log(PIXEL_LEVEL_SCALE)
"""Nats per dimension to add for images stored as 8-bit integers k and modelled as x = k / 127.5 - 1 in [-1, 1]:
one integer level is 1/127.5 wide in x, so log P(k) = log p(x) - log 127.5 per dimension."""

# Elements of one batched vector-Jacobian product (chunk x batch x dims) in the exact divergence; bounds memory.
_EXACT_DIV_ELEMENTS = 1 << 24


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all but the batch dimension: (B, ...) -> (B,)."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * flat.pow(2).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def velocity_and_divergence(velocity: Velocity, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The velocity (B, ...) and its exact divergence (B,) at x (B, ...), t (B,); both detached.

    Costs one backward per input dimension (run in chunks of batched VJPs), so keep it to small inputs. Assumes
    examples do not interact inside ``velocity`` (no batch statistics), which holds for the MMDiT.
    """
    batch, dims = x.shape[0], x[0].numel()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        div = torch.zeros(batch, dtype=v.dtype, device=v.device)
        if not v.requires_grad:  # v does not depend on x
            return v.detach(), div
        chunk = max(1, _EXACT_DIV_ELEMENTS // (batch * dims))
        for start in range(0, dims, chunk):
            idx = torch.arange(start, min(dims, start + chunk), device=x.device)
            rows = torch.arange(len(idx), device=x.device)
            # basis[j, b] is the one-hot vector e_{idx[j]} for every example b; its VJP is row idx[j] of J_b.
            basis = torch.zeros(len(idx), batch, dims, dtype=v.dtype, device=v.device)
            basis[rows, :, idx] = 1
            (vjp,) = torch.autograd.grad(
                v, x, basis.reshape(len(idx), *v.shape), retain_graph=True, is_grads_batched=True, allow_unused=True
            )
            if vjp is not None:  # None: v does not depend on x, so the divergence is 0
                div = div + vjp.reshape(len(idx), batch, dims)[rows, :, idx].sum(dim=0)
    return v.detach(), div.detach()


def velocity_and_trace_estimate(
    velocity: Velocity, x: Tensor, t: Tensor, probes: Tensor
) -> tuple[Tensor, Tensor]:
    """The velocity (B, ...) and Hutchinson's divergence estimate (B,), averaged over ``probes`` (K, B, ...).

    Each probe eps gives the unbiased estimate eps^T J eps (one VJP); the K probes share one batched backward.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        if not v.requires_grad:  # v does not depend on x
            return v.detach(), torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
        if probes.shape[0] == 1:
            # One probe needs no batched VJP; this path also works for models without vmap support.
            (vjp,) = torch.autograd.grad(v, x, probes[0], allow_unused=True)
            vjp = None if vjp is None else vjp.unsqueeze(0)
        else:
            (vjp,) = torch.autograd.grad(v, x, probes, is_grads_batched=True, allow_unused=True)
    if vjp is None:  # v does not depend on x
        return v.detach(), torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    est = (vjp * probes).reshape(probes.shape[0], x.shape[0], -1).sum(dim=2).mean(dim=0)
    return v.detach(), est.detach()


def log_likelihood(
    velocity: Velocity,
    x: Tensor,
    *,
    exact_divergence: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    hutchinson_samples: int = 1,
    generator: torch.Generator | None = None,
    t_start: float = 0.0,
) -> Tensor:
    """Log-density log p_0(x) in nats of data ``x`` (B, ...) under the flow ``velocity(x, t)``: returns (B,).

    Integrates data (t = ``t_start``, 0 by default) to noise (t = 1) with torchdiffeq's ``method`` at tolerances
    ``rtol``/``atol``; with ``t_start`` = eps > 0 the result is log p_eps(x) (see the module docstring), for paths
    whose velocity is singular at t = 0 (:attr:`flowmatch.flow.Formulation.likelihood_start`).
    ``exact_divergence=False`` uses Hutchinson's estimator with ``hutchinson_samples`` Rademacher probes, drawn
    once from ``generator`` and held fixed along the trajectory (the ODE must be deterministic for an adaptive
    solver); the result is then an unbiased estimate of the integral's divergence term.

    The density is that of whatever space ``velocity`` models (pixels in [-1, 1], or autoencoder latents). No
    gradient flows out. Do not call it under ``torch.inference_mode()``: the divergence needs autograd.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("log_likelihood needs autograd for the divergence; call it outside torch.inference_mode()")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    if not (isinstance(hutchinson_samples, int) and hutchinson_samples >= 1):
        raise ValueError(f"hutchinson_samples must be an integer >= 1; got {hutchinson_samples!r}")
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"t_start must be in [0, 1); got {t_start}")
    batch = x.shape[0]

    probes: Tensor | None = None
    if not exact_divergence:
        draw_device = generator.device if generator is not None else x.device
        signs = torch.randint(0, 2, (hutchinson_samples, *x.shape), generator=generator, device=draw_device)
        probes = (2 * signs - 1).to(device=x.device, dtype=x.dtype)

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        xt = state[0]
        tb = t.to(device=xt.device, dtype=xt.dtype).expand(batch)
        if probes is None:
            return velocity_and_divergence(velocity, xt, tb)
        return velocity_and_trace_estimate(velocity, xt, tb, probes)

    span = torch.tensor([t_start, 1.0], dtype=x.dtype, device=x.device)
    start = (x.detach(), torch.zeros(batch, dtype=x.dtype, device=x.device))
    from torchdiffeq import odeint  # reason: start-up cost (it loads scipy: ~0.5 s of CPU per process)

    with torch.no_grad():
        x1, div_integral = (s[-1] for s in odeint(dynamics, start, span, rtol=rtol, atol=atol, method=method))
    return standard_normal_log_prob(x1) + div_integral


def bits_per_dim(logp: Tensor, num_dims: int, data_scale_correction: float = 0.0) -> Tensor:
    """Bits per dimension ``(-logp / num_dims + data_scale_correction) / ln 2`` from log-densities (B,) in nats.

    ``data_scale_correction`` (nats per dimension) converts the density of the modelled space into the
    probability of the discrete data. For images x = k / 127.5 - 1 made from 8-bit pixels k, pass
    :data:`PIXEL_DATA_SCALE_CORRECTION` (log 127.5) and evaluate ``logp`` on :func:`dequantize_pixels` (x);
    this gives the bits/dim reported in the literature on 8-bit images. Leave it 0 for a continuous density
    (e.g. of autoencoder latents, which are not a discretisation of anything).
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1; got {num_dims}")
    return (-logp / num_dims + data_scale_correction) / math.log(2)


def dequantize_pixels(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of images x = k / 127.5 - 1 from 8-bit pixels k: adds U[0, 1/127.5) per element.

    A continuous density evaluated on the 256 discrete levels themselves can grow without bound; spreading each
    level over its bin makes ``logp - num_dims * log 127.5`` a lower bound on log P(k) (Theis et al. 2016).
    """
    draw_device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)
    return x + u / PIXEL_LEVEL_SCALE
