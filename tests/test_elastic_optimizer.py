"""The optimizer state as whole tensors by parameter name (flowmatch.engine.elastic), in one process: written beside
the per-rank files, read back bit for bit by another ZeRO stage, and its loss resets the moments with a warning.
Across world sizes: tests/test_engine.py (slow) and benchmarks/elastic.py."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from flowmatch.checkpoint import load_checkpoint, save_checkpoint
from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.engine.elastic import read_full_state


def _engine(stage: int, precision: str = "fp32", elastic: bool = True) -> Engine:
    torch.manual_seed(0)
    engine = Engine(DistributedConfig(zero_stage=stage, precision=precision, elastic_checkpoints=elastic))
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    engine.setup(model, model.parameters(), OptimConfig(lr=0.05, warmup_steps=0, schedule="constant"),
                 max_steps=10, micro_batch_size=4, grad_accum_steps=1)
    return engine


def _step(engine: Engine, seed: int) -> float:
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))
    loss = engine.forward(x.to(engine.dtype)).float().pow(2).mean()
    engine.backward(loss)
    assert engine.step().stepped
    return loss.item()


def test_zero0_state_resumes_bitwise_under_zero2_and_a_damaged_copy_resets_the_moments(tmp_path, caplog):
    source = _engine(0)
    for seed in range(3):
        _step(source, seed)
    ckpt = save_checkpoint(source, tmp_path / "run", 3, client_state={"step": 3}, recipe_yaml="", keep=2, ema=False)
    saved = read_full_state(ckpt / "state")
    after = [_step(source, seed) for seed in (3, 4)]
    source.shutdown()
    assert set(saved["0.weight"]) == {"master", "exp_avg", "exp_avg_sq", "step"} and int(saved["2.bias"]["step"]) == 3

    target = _engine(2)
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(target, ckpt) == {"step": 3}
    assert "re-sharded from their whole tensors" in caplog.text
    target.save(tmp_path / "again", {})
    again = read_full_state(tmp_path / "again")
    assert all(torch.equal(again[n][k], saved[n][k]) for n in saved for k in saved[n])  # bitwise
    resumed = [_step(target, seed) for seed in (3, 4)]
    assert resumed == pytest.approx(after, rel=1e-6)
    target.shutdown()

    # Its whole-tensor copy damaged, the checkpoint still resumes on another layout: the moments restart.
    (ckpt / "state" / "optim-full-00000.safetensors").write_bytes(b"damaged")
    caplog.clear()
    reset = _engine(2)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(reset, ckpt)
    assert "optim-full-00000.safetensors: truncated" in caplog.text and "AdamW moments restart from zero" in caplog.text
    assert reset.optimizer_steps == 3  # the schedule position is kept
    reset.save(tmp_path / "reset", {})
    assert float(read_full_state(tmp_path / "reset")["0.weight"]["exp_avg"].abs().max()) == 0.0
    reset.shutdown()



def test_without_elastic_checkpoints_another_layout_resets_the_moments_and_says_why(tmp_path, caplog):
    source = _engine(0, elastic=False)
    _step(source, 0)
    ckpt = save_checkpoint(source, tmp_path, 1, client_state={}, recipe_yaml="", keep=1, ema=False)
    source.shutdown()
    assert not list((ckpt / "state").glob("optim-full*"))
    target = _engine(2)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(target, ckpt)
    target.shutdown()
    assert "optim-full.json is missing" in caplog.text and "AdamW moments restart from zero" in caplog.text
