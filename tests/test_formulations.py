"""The diffusion formulations on flowmatch's time convention: affine paths against closed forms and diffusers'
tables, prediction conversions, loss weightings, and the DDIM / ancestral / predictor-corrector samplers."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.flow import FlowConfig, Formulation, TimeSchedule, sample_path
from flowmatch.flow.parameterization import PREDICTIONS, Denoised, convert, denoise, from_denoised, score
from flowmatch.flow.paths import PATHS, ddpm_betas, get_path
from flowmatch.flow.weighting import eps_weight, loss_factor, sd3_weight, snr
from flowmatch.sampling import sample_ode
from flowmatch.sampling.diffusion import ancestral_step, ddim_step, langevin_step, sample_diffusion
from flowmatch.sampling.gaussian import GaussianFlow
from flowmatch.training.loop import micro_loss

F64 = torch.float64


class GaussianData:
    """Data x0 ~ N(mu, diag(std^2)) on any affine path: x_t ~ N(alpha mu, V_t), V_t = alpha^2 std^2 + sigma^2, and
    E[eps | x_t = x] = sigma (x - alpha mu) / V_t exactly; the ODE's flow map is x_t = alpha mu + sqrt(V_t) z."""

    def __init__(self, path, mean, std):
        self.path, self.mean, self.var = path, mean, std**2

    def moments(self, t):
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        return a, s, a**2 * self.var + s**2

    def eps(self, x, t):
        a, s, v = self.moments(t)
        return s * (x - a * self.mean) / v

    def flow_map(self, z, t):
        a, _, v = self.moments(t)
        return a * self.mean + v.sqrt() * z

    def log_prob(self, x, t):
        a, _, v = self.moments(t)
        return (-0.5 * (x - a * self.mean) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)


def _gaussian(path_name, dims=3):
    return GaussianData(get_path(path_name), torch.tensor([0.5, -1.0, 2.0], dtype=F64)[:dims],
                        torch.tensor([0.3, 1.5, 0.7], dtype=F64)[:dims])


def _times(n=7, lo=0.0203, hi=0.9707):
    """Times off the VP tables' knots k / 1000, where the VP paths' derivatives jump."""
    return torch.linspace(lo, hi, n, dtype=F64)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("schedule,path", [("linear", "vp_linear"), ("squaredcos_cap_v2", "vp_cosine")])
def test_vp_tables_are_ddpm_schedulers_alphas_cumprod_at_k_over_1000(schedule, path):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=schedule)
    k = torch.arange(1, 1001, dtype=F64)
    abar = get_path(path).alpha(k / 1000) ** 2
    # diffusers holds the table in float32: agreement to its rounding; against the float64 product, exact.
    torch.testing.assert_close(abar.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)
    exact = torch.cumprod(1 - ddpm_betas("linear" if path == "vp_linear" else "cosine"), 0)
    torch.testing.assert_close(abar, exact, rtol=1e-13, atol=0)
    assert get_path(path).alpha(torch.zeros(1, dtype=F64)).item() == 1.0


@pytest.mark.parametrize("name", list(PATHS))
def test_path_coefficients_derivatives_and_log_snr(name):
    path = get_path(name)
    t = torch.tensor([0.0313, 0.2504, 0.5021, 0.7777, 0.9905], dtype=F64)  # inside table intervals
    a, s, da, ds = path.coefficients(t)
    torch.testing.assert_close(a, path.alpha(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(s, path.sigma(t), rtol=0, atol=1e-15)
    h = 1e-7
    torch.testing.assert_close(da, (path.alpha(t + h) - path.alpha(t - h)) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ds, (path.sigma(t + h) - path.sigma(t - h)) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path.log_snr(t), torch.log(a**2 / s**2), rtol=1e-12, atol=1e-12)
    grid = torch.linspace(0.001, 0.999, 999, dtype=F64)
    assert bool((path.log_snr(grid).diff() < 0).all())
    if path.variance_preserving:
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-15)
    else:
        torch.testing.assert_close(a, 1 - t, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PATHS))
def test_gaussian_marginals_and_exact_eps_velocity_score(name):
    """x_t's marginal by sampling, the exact posterior eps by regression, the score as the gradient of the log
    density, and the velocity as the time derivative of the exact flow map (the rectified one also against
    flowmatch.sampling.GaussianFlow)."""
    g = _gaussian(name)
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((n,), tv, dtype=F64)
        x0 = g.mean + g.var.sqrt() * torch.randn(n, 3, generator=gen, dtype=F64)
        eps = torch.randn(n, 3, generator=gen, dtype=F64)
        x_t = g.path.interpolate(x0, eps, t)
        a, s, v = g.moments(t[:1])
        torch.testing.assert_close(x_t.mean(0), (a * g.mean)[0], rtol=0, atol=0.03)
        torch.testing.assert_close(x_t.var(0), v[0], rtol=0.02, atol=0)
        slope = ((eps - eps.mean(0)) * (x_t - x_t.mean(0))).mean(0) / x_t.var(0)
        standard_error = torch.sqrt((1 - s**2 / v) / (n * v))[0]  # of a regression slope
        assert bool(((slope - (s / v)[0]).abs() < 4 * standard_error).all())  # E[eps | x_t]: slope s / V

    t = _times()
    x = torch.randn(len(t), 3, generator=gen, dtype=F64).requires_grad_(True)
    grad = torch.autograd.grad(g.log_prob(x, t).sum(), x)[0]
    x = x.detach()
    eps_hat = g.eps(x, t)
    torch.testing.assert_close(score(g.path, "eps", x, eps_hat, t), grad, rtol=1e-10, atol=1e-10)
    z = (x - g.moments(t)[0] * g.mean) / g.moments(t)[2].sqrt()
    h = 1e-6
    fd = (g.flow_map(z, t + h) - g.flow_map(z, t - h)) / (2 * h)
    torch.testing.assert_close(convert(g.path, "eps", "velocity", x, eps_hat, t), fd, rtol=1e-6, atol=1e-6)
    if name == "rectified":
        exact = GaussianFlow.diagonal(g.mean, g.var.sqrt()).velocity(x, t)
        torch.testing.assert_close(convert(g.path, "eps", "velocity", x, eps_hat, t), exact, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- parameterizations and weightings


@pytest.mark.parametrize("name", list(PATHS))
def test_conversions_round_trip_in_float64(name):
    path = get_path(name)
    gen = torch.Generator().manual_seed(1)
    t = _times(6, 0.0103, 0.9897)
    x0 = torch.randn(6, 2, 3, generator=gen, dtype=F64)
    eps = torch.randn(6, 2, 3, generator=gen, dtype=F64)
    x = path.interpolate(x0, eps, t)
    for kind in PREDICTIONS:
        pred = from_denoised(path, kind, Denoised(x0, eps), t)
        d = denoise(path, kind, x, pred, t)
        torch.testing.assert_close(d.x0, x0, rtol=0, atol=1e-11)
        torch.testing.assert_close(d.eps, eps, rtol=0, atol=1e-11)
        for other in PREDICTIONS:
            there = convert(path, kind, other, x, pred, t)
            torch.testing.assert_close(convert(path, other, kind, x, there, t), pred, rtol=0, atol=1e-11)
    if name == "rectified":  # the velocity is the one of flowmatch.flow.path: noise - x0
        torch.testing.assert_close(from_denoised(path, "velocity", Denoised(x0, eps), t), eps - x0, rtol=0, atol=0)
        torch.testing.assert_close(sample_path(x0, eps, t).x_t, x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(PATHS))
def test_error_scale_turns_every_loss_into_a_weighted_eps_loss(name):
    path = get_path(name)
    gen = torch.Generator().manual_seed(2)
    t = _times()
    x = torch.randn(len(t), 5, generator=gen, dtype=F64)
    eps_true, eps_pred = (torch.randn(len(t), 5, generator=gen, dtype=F64) for _ in range(2))
    eps_err = ((eps_pred - eps_true) ** 2).mean(1)
    for kind in PREDICTIONS:
        err = ((convert(path, "eps", kind, x, eps_pred, t) - convert(path, "eps", kind, x, eps_true, t)) ** 2).mean(1)
        torch.testing.assert_close(err, eps_weight(path, kind, t) * eps_err, rtol=1e-10, atol=0)
        for gamma in (1.0, 5.0):  # min-SNR-gamma is the same weight on the eps error in every prediction space
            weighted = err * loss_factor(path, kind, t, gamma)
            torch.testing.assert_close(weighted, torch.clamp(snr(path, t), max=gamma) / snr(path, t) * eps_err,
                                       rtol=1e-10, atol=0)


def test_named_weightings_in_the_sd3_papers_notation():
    t = _times()
    rf, vp = get_path("rectified"), get_path("vp_cosine")
    torch.testing.assert_close(sd3_weight(rf, "velocity", t), t / (1 - t), rtol=1e-12, atol=0)  # SD3's w_t^RF
    torch.testing.assert_close(eps_weight(vp, "eps", t), torch.ones_like(t), rtol=0, atol=0)  # eps-loss
    ratio = snr(vp, t)
    # Hang et al.'s min-SNR weights on the v-loss, min(SNR, gamma) / (SNR + 1), and on the eps-loss.
    torch.testing.assert_close(loss_factor(vp, "v", t, 5.0), ratio.clamp(max=5.0) / (ratio + 1), rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_factor(vp, "eps", t, 5.0), ratio.clamp(max=5.0) / ratio, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_factor(vp, "eps", t, 0.0), torch.ones_like(t), rtol=0, atol=0)


def test_recipe_keys_are_checked_with_the_nearest_spelling():
    with pytest.raises(ValueError, match="flow.path.*vp_linear"):
        FlowConfig(path="vp_linaer")
    with pytest.raises(ValueError, match="flow.prediction.*eps"):
        FlowConfig(prediction="epss")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        FlowConfig(min_snr_gamma=-1)


def test_few_step_objectives_refuse_another_formulation():
    """Bug caught: MeanFlow / shortcut targets (rectified velocities) silently trained against an eps model on a
    VP path, or a U-Net without the interval input."""
    from flowmatch.config import load_recipe
    from flowmatch.errors import RecipeError
    from flowmatch.training.fewstep import check_recipe

    fewstep = ["flow.objective=meanflow", "model.interval_embed=true"]
    with pytest.raises(RecipeError, match="flow.objective: meanflow.*flow.path: vp_linear"):
        check_recipe(load_recipe(None, [*fewstep, "flow.path=vp_linear", "flow.prediction=eps"]))
    with pytest.raises(RecipeError, match="flow.objective: shortcut.*model.kind: unet"):
        check_recipe(load_recipe(None, ["flow.objective=shortcut", "model.interval_embed=true",
                                        "model.preset=digits-unet"]))
    check_recipe(load_recipe(None, fewstep))
    check_recipe(load_recipe(None, ["flow.path=vp_cosine", "flow.prediction=v"]))


# ---------------------------------------------------------------- training wiring


def _recorder(out):
    def model(x, t, cond):
        out.update(x=x, t=t)
        return torch.zeros_like(x)
    return model


def _cond(b):
    from flowmatch.conditioning import Conditioning

    return Conditioning(torch.zeros(b, 2, 4), torch.ones(b, 2, dtype=torch.bool), torch.zeros(b, 4))


def test_micro_loss_trains_on_the_recipes_path_and_target():
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    for cfg in (FlowConfig(caption_dropout=0.0), FlowConfig(caption_dropout=0.0, path="vp_linear",
                                                            prediction="eps", time_dist="uniform")):
        seen = {}
        m = micro_loss(_recorder(seen), x0, _cond(8), _cond(1), schedule=TimeSchedule(cfg), flow=cfg, patch_size=2,
                       generator=torch.Generator().manual_seed(4))
        gen = torch.Generator().manual_seed(4)  # the same draws in the same order: noise, then times
        noise = torch.randn(x0.shape, generator=gen)
        t = TimeSchedule(cfg).sample(8, seq_len=4, generator=gen)
        torch.testing.assert_close(seen["t"], t, rtol=0, atol=0)
        if cfg.path == "rectified":  # bit-identical to the rectified-flow loss
            expected = sample_path(x0, noise, t)
            assert torch.equal(seen["x"], expected.x_t)
            assert torch.equal(m.loss, TimeSchedule(cfg).loss(torch.zeros_like(x0), expected.target, t).loss)
        else:  # x_t = alpha x0 + sigma eps and the eps target: a zero prediction's loss is mean(eps^2)
            torch.testing.assert_close(seen["x"], get_path("vp_linear").interpolate(x0, noise, t))
            torch.testing.assert_close(m.per_sample, noise.pow(2).flatten(1).mean(1))


def test_min_snr_reaches_the_loss():
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    losses = []
    for gamma in (0.0, 5.0):
        cfg = FlowConfig(caption_dropout=0.0, path="vp_cosine", prediction="v", min_snr_gamma=gamma)
        m = micro_loss(_recorder({}), x0, _cond(8), _cond(1), schedule=TimeSchedule(cfg), flow=cfg, patch_size=2,
                       generator=torch.Generator().manual_seed(4))
        losses.append(m)
    factor = loss_factor(get_path("vp_cosine"), "v", losses[0].t.double(), 5.0).float()
    torch.testing.assert_close(losses[1].per_sample, losses[0].per_sample * factor, rtol=1e-5, atol=0)


def test_validation_loss_compares_the_prediction_with_its_own_target():
    from flowmatch.training.validation import fixed_time_loss

    form = Formulation(FlowConfig(path="vp_linear", prediction="eps"))
    x0 = torch.zeros(4, 1, 4, 4)  # point-mass data: x_t = sigma eps, so the exact eps prediction is x / sigma

    def oracle(x, t, cond):
        return x / get_path("vp_linear").sigma(t).reshape(-1, 1, 1, 1)

    assert fixed_time_loss(oracle, x0, _cond(4), formulation=form).item() < 1e-10
    assert fixed_time_loss(oracle, x0, _cond(4)).item() > 0.1  # read as a rectified velocity it is wrong


# ---------------------------------------------------------------- samplers


def _form(path, prediction="eps"):
    return Formulation(FlowConfig(path=path, prediction=prediction))


def _exact_predictor(g, form):
    def predict(x, t):
        return convert(g.path, "eps", form.prediction, x, g.eps(x, t), t)
    return predict


def test_ddim_is_the_published_update_and_diffusers_ddimscheduler_step():
    from diffusers import DDIMScheduler

    form = _form("vp_linear")
    g = _gaussian("vp_linear")
    steps = 20
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == [999 - 50 * i for i in range(steps)]  # our grid t = 1, 0.95, ..., 0.05
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    for eta in (0.0, 0.5):
        for i, timestep in enumerate(ref.timesteps.tolist()):
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            tb = torch.full((4,), t, dtype=F64)
            eps_hat = g.eps(x, tb)
            d = form.denoise(x, eps_hat, tb)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
            ours = ddim_step(form, x, d, t, s, eta=eta, generator=torch.Generator().manual_seed(i))
            theirs = ref.step(eps_hat.float(), timestep, x.float(), eta=eta, variance_noise=noise.float()).prev_sample
            torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)
            # Song et al.'s eq. 12 in alpha_bar: sqrt(abar_s) x0_hat + sqrt(1 - abar_s - c^2) eps_hat + c z.
            ab_t, ab_s = (get_path("vp_linear").alpha(torch.tensor([v], dtype=F64)).item() ** 2 for v in (t, s))
            c = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
            x0_hat = (x - math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(ab_t)
            published = math.sqrt(ab_s) * x0_hat + math.sqrt(max(1 - ab_s - c**2, 0.0)) * eps_hat + c * noise
            torch.testing.assert_close(ours, published, rtol=0, atol=1e-10)
            x = ours


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine"])
def test_ddim_is_euler_on_the_probability_flow_ode_in_rho_y_coordinates(name):
    """With y = x / alpha, rho = sigma / alpha the ODE is dy/drho = eps_hat: DDIM's step is Euler's there, so it
    converges to the ODE's solution at first order; the ODE through sample_ode reaches the same solution."""
    form, g = _form(name), _gaussian(name)
    predict = _exact_predictor(g, form)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    t, s = 0.6, 0.45
    tb = torch.full((3,), t, dtype=F64)
    (a_t, s_t), (a_s, s_s) = ((get_path(name).alpha(torch.tensor([v], dtype=F64)).item(),
                               get_path(name).sigma(torch.tensor([v], dtype=F64)).item()) for v in (t, s))
    eps_hat = g.eps(x, tb)
    euler_y = x / a_t + (s_s / a_s - s_t / a_t) * eps_hat
    torch.testing.assert_close(ddim_step(form, x, form.denoise(x, eps_hat, tb), t, s), a_s * euler_y, rtol=0,
                               atol=1e-12)

    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    start = g.flow_map(z, torch.full((64,), 1.0, dtype=F64))
    exact = g.flow_map(z, torch.zeros(64, dtype=F64))
    errors = []
    for steps in (25, 50, 100):
        x_ddim = sample_diffusion(predict, start, formulation=form, sampler="ddim", steps=steps).x
        errors.append((x_ddim - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(0.7 < o < 1.3 for o in orders), (errors, orders)
    velocity = form.to_velocity(lambda x, t: predict(x, t))
    x_ode = sample_ode(velocity, start, steps=400, solver="heun").x
    assert (x_ode - exact).abs().max().item() < 5e-3  # sigma_t ~ sqrt(t) near t = 0 limits solvers in t


def test_ddim_on_the_rectified_path_is_the_euler_solver():
    form, g = _form("rectified", "velocity"), _gaussian("rectified")
    predict = GaussianFlow.diagonal(g.mean, g.var.sqrt()).velocity  # exact at t = 1 too, where eps -> x0 is 0 / 0
    start = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    ddim = sample_diffusion(predict, start, formulation=form, sampler="ddim", steps=7).x
    torch.testing.assert_close(ddim, sample_ode(predict, start, steps=7).x, rtol=0, atol=1e-12)


def test_ancestral_step_one_step_marginal_is_the_forward_process():
    """Point-mass data (the x0 prediction is exact): x_t ~ q(x_t), one ancestral step to s gives x_s ~ q(x_s)."""
    path = get_path("vp_cosine")
    form = _form("vp_cosine", "x0")
    mu = torch.tensor([1.0, -0.5], dtype=F64)
    n = 200_000
    gen = torch.Generator().manual_seed(9)
    for t, s in ((0.9, 0.6), (0.4, 0.39), (0.2, 0.0)):
        a_t, s_t = path.alpha(torch.tensor([t], dtype=F64)), path.sigma(torch.tensor([t], dtype=F64))
        x_t = a_t * mu + s_t * torch.randn(n, 2, generator=gen, dtype=F64)
        tb = torch.full((n,), t, dtype=F64)
        d = form.denoise(x_t, mu.expand(n, 2), tb)
        x_s = ancestral_step(form, x_t, d, t, s, generator=gen)
        a_s, s_s = path.alpha(torch.tensor([s], dtype=F64)), path.sigma(torch.tensor([s], dtype=F64))
        torch.testing.assert_close(x_s.mean(0), a_s * mu, rtol=0, atol=0.01)
        torch.testing.assert_close(x_s.std(0), s_s.expand(2), rtol=0.01, atol=1e-12)
        # ... and it is DDIM with eta = 1 drawing the same noise.
        same = ddim_step(form, x_t[:5], form.denoise(x_t[:5], mu.expand(5, 2), tb[:5]), t, s, eta=1.0,
                         generator=torch.Generator().manual_seed(0))
        anc = ancestral_step(form, x_t[:5], form.denoise(x_t[:5], mu.expand(5, 2), tb[:5]), t, s,
                             generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(same, anc, rtol=0, atol=1e-12)


def test_langevin_corrector_relaxes_to_the_marginal_and_pc_samples_the_data():
    # Equal variances: the step size follows the score's norm, so one narrow coordinate would slow the others.
    g = GaussianData(get_path("vp_cosine"), torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.full((3,), 0.7, dtype=F64))
    form = _form("vp_cosine")
    predict = _exact_predictor(g, form)
    gen = torch.Generator().manual_seed(10)
    n, t = 4000, 0.5
    tb = torch.full((n,), t, dtype=F64)
    a, _, v = g.moments(tb[:1])
    # Twice q_t's spread and off its mean; at r = 0.16 each step contracts the error by about 2 r^2 = 5%.
    x = a[0] * g.mean + 0.5 + 2 * v[0].sqrt() * torch.randn(n, 3, generator=gen, dtype=F64)
    for _ in range(200):
        x = langevin_step(form, x, form.denoise(x, predict(x, tb), tb), t, snr=0.16, generator=gen)
    torch.testing.assert_close(x.mean(0), (a * g.mean)[0], rtol=0, atol=0.06)
    torch.testing.assert_close(x.var(0), v[0], rtol=0.1, atol=0)

    noise = torch.randn(n, 3, generator=gen, dtype=F64)
    out = sample_diffusion(predict, noise, formulation=form, sampler="pc", steps=50, corrector_steps=1,
                           generator=gen)
    assert out.nfe == 100
    torch.testing.assert_close(out.x.mean(0), g.mean, rtol=0, atol=0.05)
    torch.testing.assert_close(out.x.var(0), g.var, rtol=0.1, atol=0.01)


def test_clip_x0_clamps_the_data_prediction_of_the_samplers():
    form = _form("vp_cosine")
    wild = lambda x, t: 50 * torch.ones_like(x)  # noqa: E731 - an eps far off: x0_hat explodes near t = 1
    start = torch.randn(4, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    for sampler in ("ddim", "ancestral"):
        free = sample_diffusion(wild, start, formulation=form, sampler=sampler, steps=5).x
        clipped = sample_diffusion(wild, start, formulation=form, sampler=sampler, steps=5, clip_x0=1.0,
                                   generator=torch.Generator().manual_seed(0)).x
        assert free.abs().max() > 10 and clipped.abs().max() <= 1.0  # the last step returns x0_hat
