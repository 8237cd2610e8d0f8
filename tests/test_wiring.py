"""How the trainer and the pipeline use the math: each test fails on a one-line wiring bug named in its docstring."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.errors import RecipeError
from flowmatch.flow import FlowConfig, TimeSchedule, loss_weight, shift_time
from flowmatch.sampling import GenerationConfig, Pipeline
from flowmatch.training import train
from flowmatch.training.assembly import batch_plan
from flowmatch.training.loop import micro_loss

ROOT = Path(__file__).resolve().parents[1]


def _cond(batch: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 3, 4, generator=g), torch.ones(batch, 3, dtype=torch.bool),
                        torch.randn(batch, 5, generator=g))


def _loss(velocity, x0, flow: FlowConfig, seed: int = 0):
    cond = _cond(len(x0))
    return micro_loss(velocity, x0, cond, _cond(1, seed=1), schedule=TimeSchedule(flow), flow=flow, patch_size=1,
                      generator=torch.Generator().manual_seed(seed))


def test_the_loss_regresses_noise_minus_data_along_the_straight_path():
    """Bug caught: the trainer calling the path with data and noise swapped (or the target's sign flipped).

    With every sample at the same point mu, the exact velocity of the straight path is (x_t - mu) / t, whose
    loss is zero; swapping data and noise makes the same field wrong everywhere.
    """
    mu = torch.linspace(-1, 1, 2 * 4 * 4).reshape(1, 2, 4, 4)
    x0 = mu.expand(64, -1, -1, -1).clone()

    def exact(x, t, cond):
        return (x - mu) / t[:, None, None, None]

    out = _loss(exact, x0, FlowConfig(caption_dropout=0.0))
    assert out.loss.item() < 1e-8
    swapped = _loss(lambda x, t, c: -exact(x, t, c), x0, FlowConfig(caption_dropout=0.0))
    assert swapped.loss.item() > 1.0


def test_the_loss_uses_the_recipes_weighting():
    """Bug caught: the loss weighting replaced by the unweighted loss in the trainer."""
    x0 = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731 - prediction error is then exactly the target
    flow = FlowConfig(caption_dropout=0.0, time_dist="uniform", loss_weighting="logit_normal")
    weighted = _loss(zero, x0, flow)
    unweighted = _loss(zero, x0, FlowConfig(caption_dropout=0.0, time_dist="uniform"))
    torch.testing.assert_close(weighted.t, unweighted.t)  # the same draws
    torch.testing.assert_close(weighted.per_sample, unweighted.per_sample * loss_weight(weighted.t, "logit_normal"))
    assert abs(weighted.loss.item() - unweighted.loss.item()) > 1e-3


def test_the_loss_drops_captions_at_the_recipes_rate():
    """Bug caught: caption dropout not applied in the loss (the model always sees the captions), or at another
    rate than flow.caption_dropout."""
    x0, null = torch.zeros(400, 1, 2, 2), _cond(1, seed=1)  # _loss's null conditioning
    seen = {}

    def record(x, t, cond):
        seen["pooled"] = cond.pooled
        return torch.zeros_like(x)

    for p in (0.0, 0.25, 1.0):
        _loss(record, x0, FlowConfig(caption_dropout=p))
        dropped = (seen["pooled"] == null.pooled).all(dim=1).float().mean().item()  # rows the model saw as null
        assert abs(dropped - p) < 0.07, (p, dropped)


def test_training_times_carry_the_shift():
    """Bug caught: the time shift ignored in training (e.g. the sampler drawing plain times)."""
    x0 = torch.zeros(512, 1, 2, 2)
    seen = {}

    def record(x, t, cond):
        seen.setdefault("t", t)
        return torch.zeros_like(x)

    plain = _loss(record, x0, FlowConfig(time_dist="uniform", shift=1.0)).t
    seen.clear()
    shifted = _loss(record, x0, FlowConfig(time_dist="uniform", shift=3.0)).t
    torch.testing.assert_close(seen["t"], shifted)  # the model saw the shifted times
    torch.testing.assert_close(shifted, shift_time(plain, 3.0))
    assert shifted.mean() > plain.mean() + 0.15


def test_the_trainer_draws_times_from_the_recipes_resolution_shift(tmp_path, digit_shards, monkeypatch):
    """Bug caught: the trainer building its time schedule without the recipe's flow section or sequence length.

    8x8 digits in 2x2 patches are 16 tokens; with base_seq_len 4 the resolution mode shifts by 1.5 * sqrt(16 / 4)
    = 3, which moves the mean of uniform times from 0.5 to 1.5 - 0.75 ln 3 = 0.676.
    """
    from flowmatch.training.assembly import EngineVelocity

    seen = []
    real = EngineVelocity.__call__

    def record(self, x, t, cond):
        seen.append(t.detach().clone())
        return real(self, x, t, cond)

    monkeypatch.setattr(EngineVelocity, "__call__", record)
    flow = ["flow.time_dist=uniform", "flow.shift_mode=resolution", "flow.base_seq_len=4", "flow.shift=1.5"]
    train(_tiny(tmp_path, digit_shards, "train.max_steps=1", "train.batch_size=128", "train.ema_decay=0",
                 "train.ema_profiles=[]", *flow))
    assert seen[0].shape == (128,) and 0.62 < seen[0].mean().item() < 0.74


def _toy_pipeline(recipe, calls: list):
    """A Pipeline over a toy model whose velocity depends on t and on the conditioning."""
    from flowmatch.encoders.frozen import FrozenEncoders

    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels)

    def model(x, t, cond):
        calls.append(t.clone())
        return x * t[:, None, None, None] + cond.pooled.mean(1)[:, None, None, None]

    return Pipeline(model, encoders, GenerationConfig.of(recipe))


def test_sampling_walks_the_recipes_shifted_grid_and_guidance():
    """Bugs caught: the shift ignored at sampling; the pipeline ignoring the recipe's guidance scale."""
    # 16 tokens of 2x2 pixels against a base of 4: the resolution mode's shift is 1.5 * sqrt(16 / 4) = 3.
    flow = ["flow.shift_mode=resolution", "flow.base_seq_len=4", "flow.shift=1.5"]
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [*flow, "sampling.guidance_scale=1.0"])
    calls: list = []
    pipe = _toy_pipeline(recipe, calls)
    plain = pipe.generate(["a handwritten 3"], steps=4, seed=0)
    expected = shift_time(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0)[:4].float()
    torch.testing.assert_close(torch.cat(calls), expected)  # Euler evaluates at 1, 0.9, 0.75, 0.5
    recipe.sampling.guidance_scale = 3.0
    calls.clear()
    guided = pipe.generate(["a handwritten 3"], steps=4, seed=0)
    assert [len(c) for c in calls] == [2] * 4  # conditional and unconditional in one batch
    assert not torch.allclose(guided, plain)
    torch.testing.assert_close(guided, pipe.generate(["a handwritten 3"], steps=4, seed=0, guidance_scale=3.0))


def test_recipe_errors_for_a_batch_clash_and_an_input_size_mismatch(tmp_path, digit_shards):
    """Bugs caught: the batch-size clash or the model/encoder size mismatch passing silently."""
    assert batch_plan(128, None, 2) == (64, 1) and batch_plan(128, 16, 2) == (16, 4)
    with pytest.raises(RecipeError, match=r"train.batch_size=100 is not a multiple of micro_batch_size \(16\) x "
                                          r"processes \(2\)"):
        batch_plan(100, 16, 2)
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [f"run_dir={tmp_path / 'r'}", f"data.shards={digit_shards}",
                                                            "model.preset=tiny", "model.context_dim=17"])
    with pytest.raises(RecipeError, match="model.context_dim=17 but the text encoder gives 384"):
        train(recipe)
    # A model without a pooled vector (Qwen-Image's presets say pooled_dim: 0) names the encoder setting to change.
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [f"run_dir={tmp_path / 'q'}", f"data.shards={digit_shards}",
                                                            "model.preset=tiny-qwen-image"])
    with pytest.raises(RecipeError, match="model.pooled_dim=0 .* but the text encoder gives 384: set pooling: none"):
        train(recipe)


def _tiny(tmp_path, shards, *more):
    overrides = [f"run_dir={tmp_path}", f"data.shards={shards}", "model.preset=tiny", "train.batch_size=8",
                 "train.checkpoint_every=100", "train.log_every=1", "optim.warmup_steps=0", "data.num_workers=0",
                 "logging.tensorboard=false", "logging.progress=false", "sampling.per_prompt=1", "sampling.steps=1",
                 "sampling.prompts=[a handwritten 3]", "eval.likelihood_samples=0", *more]
    return load_recipe(ROOT / "recipes" / "digits.yaml", overrides)


def test_the_trainer_drops_captions_at_the_recipes_rate(tmp_path, digit_shards, monkeypatch):
    """Bug caught: the trainer handing the loss another caption dropout than flow.caption_dropout (e.g. 0, or the
    encoders' defaults): the loss is pinned above, this pins what the trainer gives it."""
    from flowmatch.training import loop

    rates = []

    def recording(*args, dropout_parts=None, flow=None, **kwargs):
        rates.append([p for _, p in dropout_parts] if dropout_parts is not None else [flow.caption_dropout])
        return micro_loss(*args, dropout_parts=dropout_parts, flow=flow, **kwargs)

    monkeypatch.setattr(loop, "micro_loss", recording)
    train(_tiny(tmp_path, digit_shards, "train.max_steps=1", "flow.caption_dropout=0.37"))
    assert rates and all(r and set(r) == {0.37} for r in rates), rates


@pytest.mark.parametrize("warmup", [0.1, 0.0])
def test_the_ema_follows_each_update(tmp_path, digit_shards, monkeypatch, warmup):
    """Bugs caught: the EMA update not being called by the trainer, or with another decay than the recipe's
    warm-up formula (e.g. the warm-up or its update count left out)."""
    from flowmatch.engine import Engine
    from flowmatch.engine.power_ema import gamma_of, warmup_decay

    decay, snapshots = 0.5, []
    real_step, real_setup = Engine.step, Engine.setup

    def setup(self, *args, **kwargs):
        real_setup(self, *args, **kwargs)
        snapshots.append(self.model_state_dict())  # the initial weights

    def step(self):
        result = real_step(self)
        snapshots.append(self.model_state_dict())
        return result

    monkeypatch.setattr(Engine, "setup", setup)
    monkeypatch.setattr(Engine, "step", step)
    train(_tiny(tmp_path, digit_shards, "train.max_steps=3", f"train.ema_decay={decay}", f"train.ema_warmup={warmup}"))
    ema = load_file(tmp_path / "checkpoints" / "3" / "ema.safetensors")
    expected = {k: v.clone() for k, v in snapshots[0].items()}
    for n, weights in enumerate(snapshots[1:], start=1):
        beta = warmup_decay(n, decay, gamma_of(warmup) if warmup else None)  # 0, 0.004, 0.040 with warm-up 0.1
        for k in expected:
            expected[k] = beta * expected[k] + (1 - beta) * weights[k]
    name = "final.linear.weight" if "final.linear.weight" in ema else next(iter(ema))
    assert not torch.equal(ema[name], snapshots[0][name])  # it moved
    for k in ema:
        torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_run_records_and_proves_its_precision(tmp_path, digit_shards, precision):
    """Bug caught: bf16 silently off (the engine building fp32 weights whatever the recipe says)."""
    summary = train(_tiny(tmp_path, digit_shards, "train.max_steps=1", f"distributed.precision={precision}"))
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
    assert summary.compute_dtype == dtype
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"precision": precision, "weights_dtype": dtype, "compute_dtype": dtype}.items() <= lines[0].items()
