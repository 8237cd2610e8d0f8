"""Few-step generation: the MeanFlow identity, the JVP backends, shortcut targets, guidance as an input, the
average-velocity sampler, and the objectives wired through the trainer. Each test names the bug it catches."""

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_scripts.fewstep_grads import STEPS, run_one
from launching import launch, rank_envs
from safetensors.torch import load_file

from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.errors import RecipeError
from flowmatch.families.presets import config_from_preset
from flowmatch.flow import (
    FlowConfig,
    MeanFlowConfig,
    ObjectiveModels,
    ShortcutConfig,
    TimeSchedule,
    objective_loss,
    time_derivative,
)
from flowmatch.flow.flowmap import teacher_average_velocity
from flowmatch.flow.meanflow import meanflow_target
from flowmatch.flow.shortcut import bootstrap_target, consistency_times
from flowmatch.models import MMDiT
from flowmatch.sampling import sample_average, sample_latents

ROOT = Path(__file__).resolve().parents[1]
MU, SIGMA = 0.7, 0.4  # the data of the closed-form flow: every element N(MU, SIGMA^2) independently


# -- the Gaussian flow: x_t = (1 - t) x0 + t noise with x0 ~ N(MU, SIGMA^2), noise ~ N(0, 1) -------------------------

def _bt(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _scale(t):
    """Standard deviation s_t of x_t and its derivative in t."""
    s = torch.sqrt((1 - t) ** 2 * SIGMA**2 + t**2)
    return s, ((t - 1) * SIGMA**2 + t) / s


def gaussian_v(x, t):
    """The exact marginal velocity: mean -MU plus the spread's growth, v = -MU + s'_t / s_t (x - (1 - t) MU)."""
    s, ds = _scale(t)
    return -MU + _bt(ds / s, x) * (x - _bt(1 - t, x) * MU)


def gaussian_u(x, t, r):
    """The exact average velocity over [r, t] from the flow map x_r = m_r + s_r / s_t (x_t - m_t):
    (x_t - x_r) / (t - r), and v at r = t."""
    (s_t, _), (s_r, _) = _scale(t), _scale(r)
    x_r = _bt(1 - r, x) * MU + _bt(s_r / s_t, x) * (x - _bt(1 - t, x) * MU)
    gap = t - r
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    return torch.where(_bt(gap > 0, x), (x - x_r) / _bt(safe, x), gaussian_v(x, t))


def _cond(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 3, 8, generator=g), torch.ones(batch, 3, dtype=torch.bool),
                        torch.randn(batch, 8, generator=g))


@pytest.mark.parametrize("backend, tol", [("exact", 1e-10), ("finite_difference", 3e-5)])
def test_the_meanflow_identity_holds_for_the_exact_average_velocity(backend, tol):
    """Bugs caught: the JVP taking the tangent (v, 0, 1) (r moving instead of t), the target's (t - r) sign, or a
    finite difference not moving x along v."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 2, 2, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(16, generator=g, dtype=torch.float64)
    r = t * torch.rand(16, generator=g, dtype=torch.float64)
    v = gaussian_v(x, t)
    du_dt = time_derivative(gaussian_u, x, t, r, v, backend=backend)
    target = meanflow_target(v, du_dt, t, r)
    assert (target - gaussian_u(x, t, r)).abs().max().item() < tol
    # the identity is not trivially true: the average velocity differs from the instantaneous one by a lot
    assert (gaussian_u(x, t, r) - v).abs().max().item() > 0.1


def _teacher_loss(objective, student, **flow):
    """The objective's loss for a student on Gaussian data, with the exact velocity as the (unguided) teacher."""
    cfg = FlowConfig(objective=objective, caption_dropout=0.0, time_dist="uniform", **flow)
    x0 = MU + SIGMA * torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    models = ObjectiveModels(student=student, frozen=student, tangent=student,
                             teacher=lambda x, t, cond: gaussian_v(x, t))
    return objective_loss(models, x0, _cond(256), _cond(1, seed=1), schedule=TimeSchedule(cfg), flow=cfg, seq_len=4,
                          generator=torch.Generator().manual_seed(2), jvp_backend=cfg.meanflow.jvp)


def _exact_student(x, t, cond, r=None):
    return gaussian_u(x, t, t if r is None else r)


def _flow_student(x, t, cond, r=None):
    return gaussian_v(x, t)


@pytest.mark.parametrize("jvp, tol", [("exact", 1e-9), ("finite_difference", 1e-6)])  # float32 differences
def test_the_meanflow_objective_is_zero_at_the_exact_average_velocity(jvp, tol):
    """Bugs caught: the objective regressing the interval rows on v (no JVP term), feeding the JVP the wrong
    tangent or rows, or the student seeing t and r swapped; the teacher's velocity not replacing noise - x0."""
    mf = MeanFlowConfig(interval_fraction=0.5, adaptive_power=0.0, jvp=jvp)
    exact = _teacher_loss("meanflow", _exact_student, meanflow=mf)
    assert exact.loss.item() < tol
    assert _teacher_loss("meanflow", _flow_student, meanflow=mf).loss.item() > 1e-2  # a flow model is not one


def test_the_shortcut_objective_is_near_zero_at_the_exact_average_velocity():
    """Bugs caught: self-consistency rows regressed on v, or half steps taken with the wrong sign or size."""
    sc = ShortcutConfig(consistency_fraction=0.5, levels=7)
    assert _teacher_loss("shortcut", _exact_student, shortcut=sc).loss.item() < 1e-5  # only the finest Euler halves
    assert _teacher_loss("shortcut", _flow_student, shortcut=sc).loss.item() > 1e-3


@pytest.mark.parametrize("steps, tol", [(4, 2e-3), (16, 1e-4)])
def test_the_teachers_solve_gives_the_exact_average_velocity(steps, tol):
    """Bugs caught: the solve walking away from the data (h's sign), the midpoint evaluated at the wrong time,
    the jump divided by the wrong span, or r = t rows not falling back to the instantaneous velocity."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 2, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.95 * torch.rand(32, generator=g, dtype=torch.float64)
    r = torch.cat([t[:8], t[8:] * torch.rand(24, generator=g, dtype=torch.float64)])  # 8 rows with r = t
    calls = []
    u = teacher_average_velocity(lambda y, s: (calls.append(1), gaussian_v(y.double(), s.double()))[1], x, t, r,
                                 steps=steps, v0=gaussian_v(x, t).float())
    assert len(calls) == 2 * steps - 1  # v0 saves the first evaluation
    assert (u.double() - gaussian_u(x, t, r)).abs().max().item() < tol
    assert (gaussian_u(x, t, r) - gaussian_v(x, t)).abs().max().item() > 0.1  # not trivially the velocity


def test_flow_map_distillation_regresses_the_teachers_jump():
    """Bugs caught: flow.teacher_steps not reaching the interval rows (the student's own JVP / half steps still
    used), or the jump built from the wrong rows or conditioning."""
    for objective, section in (("meanflow", {"meanflow": MeanFlowConfig(interval_fraction=0.5, adaptive_power=0.0)}),
                               ("shortcut", {"shortcut": ShortcutConfig(consistency_fraction=0.5)})):
        exact = _teacher_loss(objective, _exact_student, teacher_steps=16, **section)
        assert exact.loss.item() < 1e-7
        assert _teacher_loss(objective, _flow_student, teacher_steps=16, **section).loss.item() > 1e-2

    def broken(x, t, cond, r=None):  # a student that is exact on the flow rows only
        return gaussian_v(x, t) if r is None else torch.where(_bt(r < t, x), x * 0, gaussian_u(x, t, r))

    assert _teacher_loss("meanflow", broken, teacher_steps=16,
                         meanflow=MeanFlowConfig(interval_fraction=0.5, adaptive_power=0.0)).loss.item() > 1e-2


def test_shortcut_targets_match_hand_computed_ones():
    """Bugs caught: the half-step point x_t - (D/2) u1 computed with +, the second half queried at the wrong times,
    or the finest half steps not falling back to the instantaneous velocity (r = t)."""
    calls = []

    def u(x, t, r):
        calls.append((t.tolist(), r.tolist()))
        return x * t[:, None] + r[:, None]

    x = torch.full((2, 1), 2.0)
    target = bootstrap_target(u, x, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.25]), levels=3)
    # row 0: D = 1, halves of 0.5: u1 = u(2, 1, 0.5) = 2.5, x_mid = 2 - 0.5 * 2.5 = 0.75, u2 = u(0.75, 0.5, 0) = 0.375
    # row 1: D = 0.25, halves of 0.125 = 2^-3 (finest): u1 = u(2, 0.5, 0.5) = 1.5, x_mid = 2 - 0.125 * 1.5 = 1.8125,
    #        u2 = u(1.8125, 0.375, 0.375) = 1.0546875
    torch.testing.assert_close(target, torch.tensor([[(2.5 + 0.375) / 2], [(1.5 + 1.0546875) / 2]]))
    assert calls[0] == ([1.0, 0.5], [0.5, 0.5]) and calls[1] == ([0.5, 0.375], [0.0, 0.375])


def test_shortcut_times_are_dyadic_steps_on_their_grid():
    """Bugs caught: steps that are not powers of two, t off the step's grid, or r below 0."""
    t, r = consistency_times(4000, 4, generator=torch.Generator().manual_seed(0))
    step = (t - r).double()
    k = -torch.log2(step)
    torch.testing.assert_close(k, k.round())
    assert set(k.round().long().tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(t.double() / step, (t.double() / step).round())
    assert r.min() >= 0 and t.max() <= 1


def _tiny_model(**options):
    torch.manual_seed(0)
    model = MMDiT(config_from_preset("tiny", in_channels=1, context_dim=8, pooled_dim=8, **options))
    with torch.no_grad():  # off the zero init: outputs and every input's effect non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_exact_jvp_equals_finite_differences_on_the_mmdit():
    """Bugs caught: attention left on a kernel without forward-mode AD, the interval input ignored by the model,
    or the exact backend differentiating along another tangent than the finite difference."""
    model = _tiny_model(interval_embed=True, guidance_embed=True)
    cond = _cond(4)
    cond.extra["guidance"] = torch.full((4,), 2.0)
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.1, 0.2, 0.4, 0.0])

    def u(x, t, r):
        return model(x, t, cond, r=r)

    exact = time_derivative(u, x, t, r, v, backend="exact")
    fd = time_derivative(u, x, t, r, v, backend="finite_difference")  # the default step, 1e-4
    assert exact.abs().mean() > 1e-2
    torch.testing.assert_close(exact, fd, atol=5e-3 * exact.abs().max().item(), rtol=0)
    with torch.no_grad():
        assert (u(x, t, r) - u(x, t, t)).abs().max() > 1e-3  # the model reads r


def test_a_flow_checkpoint_loads_into_a_few_step_model_unchanged():
    """Bugs caught: the interval (or guidance) embedder not starting at zero, so loading a trained flow model
    into the few-step layout would change its outputs; r not reaching the model once trained."""
    from flowmatch.init_from import NEW_EMBEDDERS

    flow = _tiny_model()
    fewstep = MMDiT(config_from_preset("tiny", in_channels=1, context_dim=8, pooled_dim=8, interval_embed=True,
                                       guidance_embed=True))
    missing, unexpected = fewstep.load_state_dict(flow.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} == set(NEW_EMBEDDERS)
    fewstep.zero_embedder("guidance_embed")  # init_weights zeroed the interval embedder already
    cond, x = _cond(3), torch.randn(3, 1, 4, 4)
    guided = Conditioning(cond.hidden, cond.mask, cond.pooled, {"guidance": torch.tensor([1.0, 2.0, 4.0])})
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.0, 0.25, 0.2])
    with torch.no_grad():
        torch.testing.assert_close(fewstep(x, t, guided, r=r), flow(x, t, cond))


def test_one_average_step_of_the_exact_model_lands_on_the_data_distribution():
    """Bugs caught: the sampler jumping with (r - t) or from the wrong end of the grid; the jump not passing r."""
    noise = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_average(gaussian_u, noise, steps=1)
    assert out.nfe == 1
    torch.testing.assert_close(out.x, MU + SIGMA * noise)  # the exact flow map of one jump
    two = sample_average(gaussian_u, noise, steps=2).x
    torch.testing.assert_close(two, MU + SIGMA * noise)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_average_sampler_is_euler_on_an_ordinary_flow_model(guidance):
    """Bugs caught: ``average`` sampling not taking the same grid as Euler, or classifier-free guidance dropped
    when the model gets r."""
    model = _tiny_model()
    cond, null, noise = _cond(2), _cond(1, seed=5), torch.randn(2, 1, 4, 4)
    kw = dict(steps=3, guidance_scale=guidance, shift=2.0)
    euler, _ = sample_latents(model, cond, null, noise, solver="euler", **kw)
    average, nfe = sample_latents(model, cond, null, noise, solver="average", **kw)
    assert nfe == 3
    torch.testing.assert_close(average, euler)


def test_a_guidance_input_model_samples_guided_in_one_forward_per_step():
    """Bugs caught: the pipeline running classifier-free guidance's second pass on a model that takes the scale,
    or not passing the recipe's scale (and r) to it."""
    calls = []
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", ["model.guidance_embed=true", "model.interval_embed=true",
                                                            "sampling.guidance_scale=1.75", "sampling.solver=average"])
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.sampling import GenerationConfig, Pipeline

    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels)

    def model(x, t, cond, r=None):
        calls.append((len(x), cond.extra["guidance"].tolist(), None if r is None else r.tolist()))
        return torch.zeros_like(x)

    Pipeline(model, encoders, GenerationConfig.of(recipe)).generate(["a handwritten 3", "a handwritten 4"], steps=2)
    assert calls == [(2, [1.75, 1.75], [0.5, 0.5]), (2, [1.75, 1.75], [0.0, 0.0])]


def test_guidance_from_data_mixes_the_models_unconditional_velocity():
    """Bugs caught: the guided target built without the model's unconditional prediction (or with the scale
    applied to it), or the student not told the scale it was trained for."""
    seen = []

    def student(x, t, cond, r=None):
        seen.append(cond)
        return torch.zeros_like(x)

    def frozen(x, t, cond, r=None):  # the "unconditional velocity": a constant 1
        assert cond.extra["guidance"].eq(1.0).all() and cond.pooled.eq(0).all()
        return torch.ones_like(x)

    cfg = FlowConfig(caption_dropout=0.0, time_dist="uniform")
    cfg.guidance.low, cfg.guidance.high = 3.0, 3.0
    x0, null = torch.zeros(8, 1, 2, 2), Conditioning(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool),
                                                     torch.zeros(1, 8))
    out = objective_loss(ObjectiveModels(student=student, frozen=frozen), x0, _cond(8), null,
                         schedule=TimeSchedule(cfg), flow=cfg, seq_len=4, generator=torch.Generator().manual_seed(0),
                         guided=True)
    assert seen[0].extra["guidance"].eq(3.0).all()
    # target 3 * (noise - 0) + (1 - 3) * 1 = 3 noise - 2 against a zero prediction
    noise_sq = out.per_sample  # E[(3 n - 2)^2] = 9 + 4 = 13 per element
    assert 10 < noise_sq.mean().item() < 16


def _tiny_recipe(tmp_path, shards, *more):
    overrides = [f"run_dir={tmp_path}", f"data.shards={shards}", "model.preset=tiny", "train.batch_size=8",
                 "train.checkpoint_every=100", "train.log_every=1", "optim.warmup_steps=0", "data.num_workers=0",
                 "logging.tensorboard=false", "logging.progress=false", "sampling.per_prompt=1", "sampling.steps=1",
                 "sampling.prompts=[a handwritten 3]", "eval.likelihood_samples=0", "train.ema_decay=0",
                 "train.ema_profiles=[]", *more]
    return load_recipe(ROOT / "recipes" / "digits.yaml", overrides)


def test_distillation_starts_from_the_teacher_and_regresses_its_velocity(tmp_path, digit_shards, monkeypatch,
                                                                          capsys):
    """Bugs caught: model.init_from not loading the teacher's weights (or not zeroing the new embedders), the
    teacher loaded but never asked for targets, or the recipe's JVP backend not reaching the objective."""
    from flowmatch import init_from
    from flowmatch.training import fewstep, train

    teacher_dir = tmp_path / "teacher"
    train(_tiny_recipe(teacher_dir, digit_shards, "train.max_steps=1"))
    teacher_weights = load_file(str(next((teacher_dir / "checkpoints").iterdir()) / "model.safetensors"))

    asked, started = [], {}
    real_load, real_new = fewstep.load_teacher, init_from.with_new_embedders

    def counting_teacher(recipe, device):
        teacher = real_load(recipe, device)
        return lambda x, t, cond: (asked.append(len(x)), teacher(x, t, cond))[1]

    def recording_new_embedders(state, cfg, seed):
        out = real_new(state, cfg, seed)
        started.update({k: v.clone() for k, v in out.items()})
        return out

    monkeypatch.setattr("flowmatch.training.assembly.load_teacher", counting_teacher)
    monkeypatch.setattr(init_from, "with_new_embedders", recording_new_embedders)
    student_dir = tmp_path / "student"
    summary = train(_tiny_recipe(student_dir, digit_shards, "train.max_steps=1", "flow.objective=meanflow",
                                 "model.interval_embed=true", "model.guidance_embed=true",
                                 f"flow.teacher={teacher_dir}", f"model.init_from={teacher_dir}",
                                 "sampling.solver=average"))
    assert summary.final_step == 1 and asked == [16]  # one teacher forward on [cond; empty caption] of batch 8
    for key, value in teacher_weights.items():
        torch.testing.assert_close(started[key], value)
    for name in ("interval_embed", "guidance_embed"):
        assert started[f"{name}.mlp.fc2.weight"].eq(0).all()
    assert f"objective meanflow, JVP backend exact, teacher {teacher_dir}" in capsys.readouterr().out

    # flow-map distillation: the 2 self-consistency rows of 8 get the teacher's 2-step midpoint solve (3 more
    # evaluations on [cond; empty caption], the first reused), and the recipe's flow.teacher_steps reaches it
    asked.clear()
    train(_tiny_recipe(tmp_path / "flowmap", digit_shards, "train.max_steps=1", "flow.objective=shortcut",
                       "flow.shortcut.consistency_fraction=0.25", "flow.teacher_steps=2", "model.interval_embed=true",
                       "model.guidance_embed=true", f"flow.teacher={teacher_dir}", f"model.init_from={teacher_dir}",
                       "sampling.solver=average"))
    assert asked == [16, 4, 4, 4]
    assert f"objective shortcut, teacher {teacher_dir} (flow map, 2 midpoint steps)" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="flow.teacher_steps: 2 .* set flow.teacher"):
        train(_tiny_recipe(tmp_path / "no-teacher", digit_shards, "train.max_steps=1", "flow.objective=shortcut",
                           "flow.teacher_steps=2", "model.interval_embed=true"))


def test_recipe_errors_name_the_key_and_a_valid_value():
    """Bugs caught: a few-step objective on a model without the interval input, or the exact JVP under ZeRO-3,
    passing silently."""
    from flowmatch.training.fewstep import check_recipe

    base = ROOT / "recipes" / "digits.yaml"
    with pytest.raises(RecipeError, match="model.interval_embed: true"):
        check_recipe(load_recipe(base, ["flow.objective=meanflow"]))
    with pytest.raises(RecipeError, match="flow.meanflow.jvp: finite_difference"):
        check_recipe(load_recipe(base, ["flow.objective=meanflow", "model.interval_embed=true",
                                        "distributed.zero_stage=3", "flow.meanflow.jvp=exact"]))
    check_recipe(load_recipe(base, ["flow.objective=meanflow", "model.interval_embed=true",
                                    "distributed.zero_stage=3"]))  # auto picks finite differences
    with pytest.raises(RecipeError, match="did you mean 'meanflow'"):
        load_recipe(base, ["flow.objective=meanflo"])


@pytest.mark.slow
def test_gradients_are_equal_on_one_and_two_processes(tmp_path):
    """Bugs caught: a target forward or JVP path that bypasses the engine's gradient reduction (the rank's own
    gradient applied), a rank-dependent draw, or ZeRO-3 with the finite-difference backend diverging."""
    # The two-process configurations in one job of two processes (no launcher: the engine is what is checked),
    # each trained in turn; the one-process ones in this process (a launch's start-up costs more than they do).
    ones = {"1-zero2-exact": (2, "exact", "meanflow"), "1-zero2-fd": (2, "finite_difference", "meanflow"),
            "1-zero2-shortcut": (2, "exact", "shortcut")}
    twos = ["2-zero2-exact:2:exact:meanflow", "2-zero3-fd:3:finite_difference:meanflow",
            "2-zero2-shortcut:2:exact:shortcut"]
    script = str(ROOT / "tests" / "dist_scripts" / "fewstep_grads.py")
    command = [sys.executable, script, "--out", str(tmp_path), *(a for spec in twos for a in ("--config", spec))]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    codes, _ = launch([command, command], logs, envs=rank_envs(2))
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    for name, (stage, jvp, objective) in ones.items():
        run_one(tmp_path / name, stage, jvp, objective, STEPS)

    def result(name):
        out = tmp_path / name
        return json.loads((out / "result.json").read_text()), load_file(str(out / "weights.safetensors"))

    for one, two in [("1-zero2-exact", "2-zero2-exact"), ("1-zero2-fd", "2-zero3-fd"),
                     ("1-zero2-shortcut", "2-zero2-shortcut")]:
        (r1, w1), (r2, w2) = result(one), result(two)
        assert r2["world_size"] == 2
        torch.testing.assert_close(torch.tensor(r1["losses"]), torch.tensor(r2["losses"]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(r1["grad_norms"]), torch.tensor(r2["grad_norms"]), rtol=1e-5,
                                   atol=1e-7)
        for key in w1:
            torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-6)
    exact, fd = result("1-zero2-exact")[0], result("1-zero2-fd")[0]
    assert abs(exact["grad_norms"][0] - fd["grad_norms"][0]) < 1e-3 * exact["grad_norms"][0]  # the backends agree
