"""Exact likelihood by the instantaneous change of variables, against Gaussian data with a known density."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.sampling import (
    PIXEL_DATA_SCALE_CORRECTION,
    bits_per_dim,
    dequantize_pixels,
    log_likelihood,
    standard_normal_log_prob,
    velocity_and_divergence,
    velocity_and_trace_estimate,
)
from flowmatch.sampling.gaussian import GaussianFlow

F64 = torch.float64


def _correlated() -> GaussianFlow:
    """N(mean, cov) in 3 dimensions with strong correlations, so the velocity's Jacobian is not diagonal."""
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.6, 0.5, 0.6]], dtype=F64)
    return GaussianFlow(torch.tensor([0.5, -1.0, 2.0], dtype=F64), a @ a.T)


def _diagonal() -> GaussianFlow:
    return GaussianFlow.diagonal(
        torch.tensor([-1.0, 0.5, 2.0, 0.0, 1.0, -0.3], dtype=F64),
        torch.tensor([0.5, 1.5, 0.8, 2.0, 0.3, 1.0], dtype=F64),
    )


def test_standard_normal_log_prob():
    z = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2))
    torch.testing.assert_close(standard_normal_log_prob(z), ref)


def test_gaussian_reference_density():
    flow = _correlated()
    x = flow.sample(5, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.MultivariateNormal(flow.mean, flow.cov).log_prob(x)
    torch.testing.assert_close(flow.log_prob(x), ref)


@pytest.mark.parametrize("flow_fn", [_diagonal, _correlated])
def test_exact_divergence_matches_jacobian_trace(flow_fn):
    flow = flow_fn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, flow.mean.shape[0], generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    v, div = velocity_and_divergence(flow.velocity, x, t)
    torch.testing.assert_close(v, flow.velocity(x, t))
    torch.testing.assert_close(div, flow.divergence(x, t), rtol=1e-10, atol=1e-10)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(lambda xb, b=b: flow.velocity(xb[None], t[b : b + 1])[0], x[b])
        torch.testing.assert_close(div[b], torch.trace(jac), rtol=1e-10, atol=1e-10)


def test_exact_divergence_nonlinear_and_multidimensional():
    # v(x) = tanh(W x) per example on (B, 2, 3) inputs: div = sum_i W_ii (1 - tanh(W x)_i^2).
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 6, generator=g, dtype=F64)
    x = torch.randn(3, 2, 3, generator=g, dtype=F64)
    vel = lambda x_, t: torch.tanh(x_.reshape(len(x_), 6) @ w.T).reshape(x_.shape)  # noqa: E731
    _, div = velocity_and_divergence(vel, x, torch.zeros(3, dtype=F64))
    expected = ((1 - torch.tanh(x.reshape(3, 6) @ w.T) ** 2) * torch.diagonal(w)).sum(1)
    torch.testing.assert_close(div, expected)


@pytest.mark.parametrize("flow_fn", [_diagonal, _correlated])
def test_log_likelihood_equals_gaussian_log_density(flow_fn):
    flow = flow_fn()
    x = flow.sample(8, generator=torch.Generator().manual_seed(3))
    x[0] += 1.0  # an unlikely point too
    logp = log_likelihood(flow.velocity, x)
    assert logp.shape == (8,) and logp.dtype == F64
    torch.testing.assert_close(logp, flow.log_prob(x), atol=1e-3, rtol=0)


def test_log_likelihood_handles_trailing_dims_and_float32():
    flow = _diagonal()
    x = flow.sample(4, generator=torch.Generator().manual_seed(4))
    logp = log_likelihood(lambda x_, t: flow.velocity(x_.double(), t.double()).float(), x.float().reshape(4, 2, 3))
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), flow.log_prob(x), atol=1e-2, rtol=0)


def test_hutchinson_is_unbiased():
    flow = _correlated()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, generator=g, dtype=F64)
    t = torch.tensor([0.3, 0.6], dtype=F64)
    exact = flow.divergence(x, t)
    probes = (2 * torch.randint(0, 2, (4000, 2, 3), generator=g) - 1).to(F64)
    # Per-probe estimates vary (the Jacobian is not diagonal), but their mean is the trace.
    singles = torch.stack([velocity_and_trace_estimate(flow.velocity, x, t, p[None])[1] for p in probes[:50]])
    assert bool((singles.std(0) > 0.1).all())
    _, mean_est = velocity_and_trace_estimate(flow.velocity, x, t, probes)
    stderr = singles.std(0) / math.sqrt(len(probes))
    assert bool(((mean_est - exact).abs() < 4 * stderr).all()), (mean_est, exact, stderr)


def test_log_likelihood_hutchinson():
    flow = _correlated()
    x = flow.sample(6, generator=torch.Generator().manual_seed(6))
    exact = flow.log_prob(x)

    def estimate(seed: int, samples: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return log_likelihood(flow.velocity, x, exact_divergence=False, hutchinson_samples=samples, generator=gen)

    torch.testing.assert_close(estimate(0), estimate(0))  # reproducible from the generator
    errors = torch.stack([estimate(seed) - exact for seed in range(20)])  # (20, 6) one-probe errors
    spread = errors.std()
    assert spread > 0.5  # one probe is noisy here (about 1.7 nats), so this is not secretly the exact path
    assert errors.mean().abs() < 4 * spread / math.sqrt(errors.numel())  # unbiased
    # Averaging 64 probes shrinks the error about 8-fold.
    assert bool(((estimate(100, samples=64) - exact).abs() < 4 * spread / 8).all())


def test_log_likelihood_refuses_inference_mode():
    flow = _diagonal()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        log_likelihood(flow.velocity, torch.zeros(1, 6, dtype=F64))


def test_bits_per_dim():
    d = 12
    logp = torch.tensor([-d * math.log(2), -2 * d * math.log(2)])
    torch.testing.assert_close(bits_per_dim(logp, d), torch.tensor([1.0, 2.0]))
    # 8-bit images in [-1, 1]: one level is 1/127.5 wide, worth log2(127.5) = 6.99 bits per dimension.
    with_pixels = bits_per_dim(logp, d, PIXEL_DATA_SCALE_CORRECTION)
    torch.testing.assert_close(with_pixels, torch.tensor([1.0, 2.0]) + math.log2(127.5))
    # Sanity: uniform noise over the 256 levels costs exactly 8 bits. Its density on [-1, 1 + 1/127.5) is
    # (127.5 / 256) per dimension.
    uniform = torch.tensor([d * math.log(127.5 / 256)])
    torch.testing.assert_close(bits_per_dim(uniform, d, PIXEL_DATA_SCALE_CORRECTION), torch.tensor([8.0]))


def test_dequantize_pixels_stays_in_the_bin():
    levels = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    x = levels / 127.5 - 1
    y = dequantize_pixels(x, generator=torch.Generator().manual_seed(1))
    assert bool((y >= x).all() and (y < x + 1 / 127.5).all())
    assert torch.equal(((y + 1) * 127.5).floor().long(), levels)


def test_velocity_independent_of_x():
    # v = 0 leaves the standard normal in place; v = c(t) translates it (zero divergence either way).
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for exact in (True, False):
        logp = log_likelihood(lambda x_, t: torch.zeros_like(x_), x, exact_divergence=exact)
        torch.testing.assert_close(logp, standard_normal_log_prob(x))
    shifted = log_likelihood(lambda x_, t: torch.ones_like(x_), x)  # x_1 = x_0 + 1
    torch.testing.assert_close(shifted, standard_normal_log_prob(x + 1))


@pytest.mark.parametrize("path_name", ["vp_linear", "vp_cosine"])
def test_vp_likelihood_from_t_eps_is_the_gaussian_marginal_there(path_name):
    """On a VP path the solve starts at t = eps (the velocity is singular at 0): for Gaussian data N(mu, std^2) the
    exact probability-flow velocity comes from E[eps | x_t] in closed form, and the result is log p_eps(x), the
    t = eps marginal N(alpha mu, alpha^2 std^2 + sigma^2) at x, up to the prior: the solve ends on N(0, I) where the
    t = 1 marginal is N(alpha_1 mu, V_1). One dimension's std (0.02) is near sigma_eps (0.01), so log p_eps is
    measurably not log p_0: a solve from another time fails."""
    from flowmatch.flow import FlowConfig, Formulation

    form = Formulation(FlowConfig(path=path_name, prediction="eps"))
    path, eps_t = form.path, form.likelihood_start
    assert eps_t == 1e-3 and Formulation(FlowConfig()).likelihood_start == 0.0
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    std = torch.tensor([0.3, 1.5, 0.02, 1.0], dtype=F64)

    def marginal(x, t):  # log N(x; alpha_t mean, V_t) summed over dims, and the moments
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        v = a**2 * std**2 + s**2
        return (-0.5 * (x - a * mean) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(1), a, s, v

    def model(x, t):  # the exact eps prediction E[eps | x_t = x]
        _, a, s, v = marginal(x, t)
        return s * (x - a * mean) / v

    velocity = form.to_velocity(model)
    x = mean + std * torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x[0, 0] += 0.5  # an unlikely point too
    logp = log_likelihood(velocity, x, t_start=eps_t)

    at_eps, a0, _, v0 = marginal(x, torch.full((6,), eps_t, dtype=F64))
    _, a1, _, v1 = marginal(x, torch.ones(6, dtype=F64))
    x1 = a1 * mean + v1.sqrt() * (x - a0 * mean) / v0.sqrt()  # the exact flow map to t = 1 keeps the z-score
    prior_mismatch = standard_normal_log_prob(x1) - marginal(x1, torch.ones(6, dtype=F64))[0]
    assert float(prior_mismatch.abs().max()) < 0.05  # alpha_1 is ~0: N(0, I) is nearly the exact prior
    # The VP velocity jumps at each of the path's 1000 knots (its beta is piecewise constant in t), which costs
    # the adaptive solve ~1e-3 nats per dimension, whatever its tolerance.
    torch.testing.assert_close(logp, at_eps + prior_mismatch, atol=2e-2, rtol=0)
    data = (-0.5 * ((x - mean) / std) ** 2 - torch.log(std * math.sqrt(2 * math.pi))).sum(1)
    assert float((at_eps - data).abs().max()) > 0.05  # well beyond the tolerance: the bound is at t = eps, not 0
    with pytest.raises(ValueError, match="t_start"):
        log_likelihood(velocity, x, t_start=1.0)
