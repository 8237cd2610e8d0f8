"""The flow math: the path convention, conversions, time distributions, the shift, the loss, and guidance."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.conditioning import Conditioning
from flowmatch.flow import (
    FlowConfig,
    TimeSchedule,
    drop_captions,
    flow_matching_loss,
    interpolate,
    loss_weight,
    noise_from_velocity,
    sample_path,
    shift_time,
    shifted_grid,
    velocity_from_noise,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)
from flowmatch.sampling import guided_velocity, sample_ode

N_SAMPLES = 200_000


def _batch(seed: int = 0, shape=(6, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, noise, t


# ---------------------------------------------------------------- path convention


def test_convention_endpoints_and_target_is_time_derivative():
    x0, noise, t = _batch()
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    assert torch.equal(interpolate(x0, noise, zeros), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, ones), noise)  # t = 1 is noise
    # The target is d x_t / dt: a central difference of the path recovers it.
    h = 1e-6
    fd = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, noise), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0, rtol=0, atol=0)


def test_time_broadcasts_per_example():
    x0, noise, t = _batch()
    x_t = interpolate(x0, noise, t)
    for i in range(t.shape[0]):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x0[i] + t[i] * noise[i], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        interpolate(x0, noise, t[:-1])


def test_conversions_round_trip_float64():
    x0, noise, t = _batch()
    x_t = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, **tol)
    torch.testing.assert_close(noise_from_velocity(x_t, v, t), noise, **tol)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t), v, **tol)
    torch.testing.assert_close(velocity_from_noise(x_t, noise, t), v, **tol)
    # Any prediction (not just the true one) round-trips: v -> x0 -> v and v -> noise -> v.
    v_any = torch.randn_like(x_t)
    torch.testing.assert_close(velocity_from_x0(x_t, x0_from_velocity(x_t, v_any, t), t), v_any, **tol)
    torch.testing.assert_close(velocity_from_noise(x_t, noise_from_velocity(x_t, v_any, t), t), v_any, **tol)
    # x0 and noise predictions from one velocity are consistent with the path.
    torch.testing.assert_close(
        interpolate(x0_from_velocity(x_t, v_any, t), noise_from_velocity(x_t, v_any, t), t), x_t, **tol
    )


def test_sample_path():
    x0, noise, t = _batch()
    s = sample_path(x0.float(), noise.float(), t)
    assert s.t.dtype == torch.float32 and s.t.shape == (6,)
    torch.testing.assert_close(s.x_t, interpolate(x0, noise, t).float())
    torch.testing.assert_close(s.target, (noise - x0).float())
    with pytest.raises(ValueError, match="same shape"):
        sample_path(x0, noise[:, :1], t)


# ---------------------------------------------------------------- shift


def test_shift_time_properties():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    for a in (0.3, 1.15, math.exp(1.15), 3.0, 7.5):
        s = shift_time(t, a)
        assert s[0] == 0.0 and s[-1] == 1.0  # exact endpoints
        assert bool((s.diff() > 0).all())  # monotone
        # The definition a t / (1 + (a - 1) t), and the odds of noise scale by a.
        torch.testing.assert_close(s, a * t / (1 + (a - 1) * t), rtol=1e-14, atol=1e-15)
        mid = slice(1, -1)
        torch.testing.assert_close(s[mid] / (1 - s[mid]), a * t[mid] / (1 - t[mid]), rtol=1e-9, atol=0)
        # a > 1 moves times towards noise.
        assert bool((s[mid] > t[mid]).all()) == (a > 1)
        # Composition multiplies: shift(shift(t, a), b) == shift(t, a b); and 1/a inverts.
        torch.testing.assert_close(shift_time(s, 2.0), shift_time(t, 2.0 * a), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(shift_time(s, 1 / a), t, rtol=1e-12, atol=1e-14)
    assert shift_time(torch.tensor([0.0, 1.0]), 1.15).tolist() == [0.0, 1.0]  # float32 too
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_shift_for_modes():
    assert TimeSchedule(FlowConfig(shift=3.0)).shift_for(1234) == 3.0
    res = TimeSchedule(FlowConfig(shift_mode="resolution", base_seq_len=256))
    assert res.shift_for(256) == pytest.approx(1.0)
    assert res.shift_for(4096) == pytest.approx(4.0)  # 1024^2 against 256^2 px: sqrt(16)
    assert TimeSchedule(FlowConfig(shift_mode="resolution", shift=0.75)).shift_for(4096) == pytest.approx(3.0)
    # FLUX: mu = 0.5 at 256 tokens and 1.15 at 4096, linear between; the factor is exp(mu).
    seq = TimeSchedule(FlowConfig(shift_mode="sequence"))
    assert seq.shift_for(256) == pytest.approx(math.exp(0.5))
    assert seq.shift_for(4096) == pytest.approx(math.exp(1.15))
    assert seq.shift_for(2176) == pytest.approx(math.exp(0.825))
    # FLUX's own time_shift formula exp(mu) / (exp(mu) + (1 / t - 1)) agrees with shift_time.
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    mu = 1.15
    torch.testing.assert_close(shift_time(t, seq.shift_for(4096)), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))


def test_sampling_grid_and_sample_share_the_shift():
    cfg = FlowConfig(time_dist="uniform", shift_mode="sequence")
    sched = TimeSchedule(cfg)
    seq_len = 1024
    a = sched.shift_for(seq_len)
    grid = sched.sampling_grid(8, seq_len=seq_len)
    assert grid.shape == (9,) and grid.dtype == torch.float64
    assert grid[0] == 1.0 and grid[-1] == 0.0 and bool((grid.diff() < 0).all())
    torch.testing.assert_close(grid, shift_time(torch.linspace(1, 0, 9, dtype=torch.float64), a))
    torch.testing.assert_close(grid, shifted_grid(8, a))
    # Uniform times pushed through the shift: P(t' <= shift(q)) = q, the grid's own map.
    t = sched.sample(N_SAMPLES, seq_len=seq_len, generator=torch.Generator().manual_seed(0))
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(t, qs), shift_time(qs, a), atol=5e-3, rtol=0)
    # Another sequence length gives another (consistent) shift, so the two are not trivially equal.
    assert not torch.allclose(sched.sampling_grid(8, seq_len=256), grid)


# ---------------------------------------------------------------- time distributions


def _draw(**kw) -> torch.Tensor:
    sched = TimeSchedule(FlowConfig(**kw))
    t = sched.sample(N_SAMPLES, seq_len=256, generator=torch.Generator().manual_seed(1))
    assert t.shape == (N_SAMPLES,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    return t.double()


def test_uniform():
    t = _draw(time_dist="uniform")
    assert t.mean().item() == pytest.approx(0.5, abs=3e-3)
    assert t.var().item() == pytest.approx(1 / 12, abs=2e-3)


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal(m, s):
    t = _draw(time_dist="logit_normal", logit_mean=m, logit_std=s)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-m)), abs=4e-3)
    logits = torch.log(t) - torch.log1p(-t)
    assert logits.mean().item() == pytest.approx(m, abs=2e-2)
    assert logits.std().item() == pytest.approx(s, rel=2e-2)


@pytest.mark.parametrize("scale", [1.29, -0.5, 0.0])
def test_mode(scale):
    t = _draw(time_dist="mode", mode_scale=scale)
    assert t.median().item() == pytest.approx(0.5, abs=4e-3)  # symmetric about 1/2
    # The map f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) decreases, so the q-quantile of t is f(1 - q).
    qs = torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=torch.float64)
    u = 1 - qs
    expected = 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    torch.testing.assert_close(torch.quantile(t, qs), expected, atol=5e-3, rtol=0)


def test_mode_scale_concentrates_mass_in_the_middle():
    inner = lambda t: ((t > 0.25) & (t < 0.75)).double().mean().item()  # noqa: E731
    assert inner(_draw(time_dist="mode", mode_scale=1.29)) > inner(_draw(time_dist="uniform")) + 0.1


def test_cosmap():
    t = _draw(time_dist="cosmap")
    assert t.median().item() == pytest.approx(0.5, abs=4e-3)
    qs = torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=torch.float64)
    expected = 1 - 1 / (torch.tan(math.pi / 2 * qs) + 1)
    torch.testing.assert_close(torch.quantile(t, qs), expected, atol=5e-3, rtol=0)


def test_sample_is_reproducible_and_shifted():
    sched = TimeSchedule(FlowConfig(shift=3.0))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, b = sched.sample(64, seq_len=1, generator=g()), sched.sample(64, seq_len=1, generator=g())
    assert torch.equal(a, b)
    unshifted = TimeSchedule(FlowConfig()).sample(64, seq_len=1, generator=g())
    torch.testing.assert_close(a, shift_time(unshifted.double(), 3.0).float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(time_dist="logitnormal"), r"time_dist.*uniform, logit_normal, mode, cosmap.*did you mean 'logit_normal'"),
        (dict(shift_mode="resolutoin"), r"shift_mode.*fixed, resolution, sequence.*'resolution'"),
        (dict(loss_weighting="cosmapp"), r"loss_weighting.*none"),
        (dict(logit_std=0.0), "logit_std"),
        (dict(mode_scale=2.0), "mode_scale"),
        (dict(shift=0.0), "shift"),
        (dict(base_seq_len=0), "base_seq_len"),
        (dict(max_seq_len=128), "max_seq_len"),
        (dict(caption_dropout=1.5), "caption_dropout"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        FlowConfig(**kw)


def test_config_fields_documented():
    import ast
    import inspect

    import flowmatch.flow.timesteps as mod

    tree = ast.parse(inspect.getsource(mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FlowConfig")
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1]
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value.value, str), node.target.id


# ---------------------------------------------------------------- loss


def test_loss_is_mse_per_sample():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    out = flow_matching_loss(pred.bfloat16(), target, t)
    assert out.per_sample.dtype == torch.float32 and out.per_sample.shape == (4,)
    torch.testing.assert_close(out.per_sample, ((pred.bfloat16().float() - target) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(out.loss, out.per_sample.mean())
    assert flow_matching_loss(target, target, t).loss.item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(pred[:, :1], target, t)


def test_loss_weightings_are_densities():
    # Each named weighting is a probability density on (0, 1): weighting uniform t by it equals sampling from it.
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    for name, kw in [("cosmap", {}), ("logit_normal", {}), ("logit_normal", dict(logit_mean=0.7, logit_std=0.5))]:
        w = loss_weight(t, name, **kw).double()
        assert torch.trapezoid(w, t).item() == pytest.approx(1.0, abs=1e-3), name
    # The logit-normal weight is the density of the logit-normal samples (histogram of 20 bins).
    sched = TimeSchedule(FlowConfig(loss_weighting="logit_normal", logit_mean=0.3))
    samples = sched.sample(N_SAMPLES, seq_len=1, generator=torch.Generator().manual_seed(3))
    hist = torch.histc(samples, bins=20, min=0, max=1) / N_SAMPLES * 20
    centers = (torch.arange(20) + 0.5) / 20
    torch.testing.assert_close(hist, sched.loss_weight(centers), atol=0.05, rtol=0.05)
    pred, target = torch.ones(3, 2), torch.zeros(3, 2)
    tt = torch.tensor([0.2, 0.5, 0.8])
    torch.testing.assert_close(sched.loss(pred, target, tt).per_sample, sched.loss_weight(tt))
    with pytest.raises(ValueError, match="allowed"):
        flow_matching_loss(pred, target, tt, "sigma")


# ---------------------------------------------------------------- classifier-free guidance


def _text(batch: int, length: int, seed: int, real: int | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, : real or length] = True
    hidden = torch.randn(batch, length, 4, generator=g) * mask[..., None]
    return Conditioning(hidden, mask, torch.randn(batch, 3, generator=g))


def _model(calls: list[int]):
    """A toy velocity model that reads every conditioning input and ignores masked tokens."""

    def model_fn(x, t, cond: Conditioning):
        calls.append(x.shape[0])
        ctx = (cond.hidden * cond.mask[..., None]).sum((1, 2))
        return x * (1 + t[:, None, None]) + (ctx + cond.pooled.sum(1))[:, None, None]

    return model_fn


def test_guided_velocity_one_batched_forward_matches_formula():
    b, scale = 3, 4.5
    cond, uncond = _text(b, 7, seed=0, real=5), _text(1, 4, seed=1, real=1)  # null is shorter and batch 1
    x, t = torch.randn(b, 2, 2), torch.rand(b)
    calls: list[int] = []
    model_fn = _model(calls)
    v = guided_velocity(model_fn, cond, uncond, scale)(x, t)
    assert calls == [2 * b]  # one forward over cond and uncond together
    v_c = model_fn(x, t, cond)
    v_u = model_fn(x, t, uncond.expand(b))
    torch.testing.assert_close(v, v_u + scale * (v_c - v_u))
    assert not torch.allclose(v, v_c)
    # No guidance: a single forward of batch B.
    for no_guidance in (None, 1.0):
        calls.clear()
        torch.testing.assert_close(guided_velocity(model_fn, cond, uncond, no_guidance)(x, t), v_c)
        assert calls == [b]
    with pytest.raises(ValueError, match="empty caption"):
        guided_velocity(model_fn, cond, None, scale)
    # It is an ordinary velocity field for the samplers.
    calls.clear()
    sol = sample_ode(guided_velocity(model_fn, cond, uncond, scale), x, steps=3)
    assert sol.nfe == 3 and calls == [2 * b] * 3


def test_drop_captions():
    b = 2000
    text, null = _text(b, 6, seed=0), _text(1, 3, seed=1, real=1)
    assert drop_captions(text, null, 0.0) is text
    out = drop_captions(text, null, 0.25, generator=torch.Generator().manual_seed(0))
    again = drop_captions(text, null, 0.25, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, Conditioning) and torch.equal(out.hidden, again.hidden)
    assert out.hidden.shape == (b, 6, 4) and out.mask.shape == (b, 6)
    dropped = (out.pooled == null.pooled).all(1)
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.04)
    # Dropped rows are the empty caption's encoding, padded with masked zeros; kept rows are untouched.
    torch.testing.assert_close(out.hidden[dropped][:, :3], null.hidden.expand(int(dropped.sum()), 3, 4))
    assert out.hidden[dropped][:, 3:].abs().sum() == 0 and not out.mask[dropped][:, 1:].any()
    assert torch.equal(out.hidden[~dropped], text.hidden[~dropped])
    assert torch.equal(out.mask[~dropped], text.mask[~dropped])
    # p = 1: every row, and the null encoding may be the longer one (then the captions get padded).
    longer_null = _text(1, 9, seed=2, real=2)
    everything = drop_captions(text, longer_null, 1.0)
    assert everything.hidden.shape == (b, 9, 4) and torch.equal(everything.mask, longer_null.mask.expand(b, 9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_captions(text, null, 1.5)
