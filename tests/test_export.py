"""`flowmatch export` of a tiny trained digits run: the transformer loads in diffusers' SD3Transformer2DModel with
the checkpoint's exact weights and the same outputs, in both key formats. (A ZeRO-3 run of 2 processes exports the
same way from its consolidated checkpoint: tests/test_train_distributed.py, on the session's launched run.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file

from flowmatch.checkpoint import load_recipe_yaml, load_weights
from flowmatch.cli import main
from flowmatch.config import recipe_from_yaml
from flowmatch.dtypes import DTYPES
from flowmatch.export import _sizes_from_weights
from flowmatch.families.convert import from_diffusers, from_original
from flowmatch.models import MMDiT
from flowmatch.training import train
from tests.interop_models import (
    one_thread,  # noqa: F401 - applies the module-wide fixture
    rel_err,
)
from tests.test_train import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digit_shards) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_recipe(run, digit_shards, **{"train.max_steps": 2}))
    return run


def checkpoint_model(run: Path, ema: bool) -> MMDiT:
    """Our model with the checkpoint's weights, as `flowmatch sample` would load it."""
    state = load_weights(run, ema=ema)
    model = MMDiT(_sizes_from_weights(recipe_from_yaml(load_recipe_yaml(run)).model, state))
    model.load_state_dict(state)
    return model.eval()


def digits_inputs(model: MMDiT, batch=3, text_len=6):
    from flowmatch.conditioning import Conditioning

    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    cond = Conditioning(torch.randn(batch, text_len, cfg.context_dim, generator=g),
                        torch.ones(batch, text_len, dtype=torch.bool), torch.randn(batch, cfg.pooled_dim, generator=g))
    return x, t, cond


def assert_same_as_checkpoint(transformer_dir: Path, run: Path, ema: bool) -> None:
    ours = checkpoint_model(run, ema)
    theirs = SD3Transformer2DModel.from_pretrained(transformer_dir).eval()
    x, t, cond = digits_inputs(ours)
    with torch.no_grad():
        assert rel_err(ours(x, t, cond), theirs(x, cond.hidden, cond.pooled, t * 1000).sample) < REL_TOL
    back = from_diffusers(transformer_dir).state_dict()
    for name, value in load_weights(run, ema=ema).items():
        assert torch.equal(back[name], value), name


def test_export_diffusers_loads_in_diffusers_with_the_checkpoint_weights(digits_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(digits_run), str(out)]) == 0
    said = capsys.readouterr().out
    assert "SD3Transformer2DModel" in said and "transformer only" in said and "MiB" in said
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    assert_same_as_checkpoint(out / "transformer", digits_run, ema=True)  # EMA by default
    # The run's shift (digits: fixed 1.0) in the scheduler.
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.shift == 1.0 and not scheduler.config.use_dynamic_shifting

    raw = tmp_path / "raw"
    assert main(["export", str(digits_run / "checkpoints" / "2"), str(raw), "--weights", "raw"]) == 0
    assert_same_as_checkpoint(raw / "transformer", digits_run, ema=False)
    assert main(["export", str(digits_run), str(raw), "--weights", "raw"]) == 1  # never over an export
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_original_keys(digits_run, tmp_path, dtype):
    out = tmp_path / "out"
    assert main(["export", str(digits_run), str(out), "--format", "original", "--dtype", dtype]) == 0
    keys = load_file(out / "transformer.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in keys) and any(".x_block.attn.qkv." in k for k in keys)
    loaded = from_original(out / "transformer.safetensors").state_dict()
    for name, value in load_weights(digits_run, ema=True).items():
        assert torch.equal(loaded[name], value.to(DTYPES[dtype])), name
