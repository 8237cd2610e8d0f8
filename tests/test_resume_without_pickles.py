"""Resuming reads no pickle, and is bit-identical, under ZeRO 0, 2 and 3 (fp32, and ZeRO-2 in bf16, where the fp32
masters differ from the working weights); a checkpoint of the previous format, whose optimizer state is a
DeepSpeed pickle, resumes without it.

For each configuration tests/dist_scripts/train_tiny.py trains 8 steps in one process (checkpoints at 4 and 8);
its step-4 checkpoint is copied into a fresh run directory and resumed to step 8 with ``torch.load`` raising
whatever it is given. The resumed run must end bit-identical to the uninterrupted one: losses of steps 5-8,
weights, EMA and the saved optimizer state (fp32 masters, AdamW moments and steps). A resume that restored only
the weights (moments from zero) or rebuilt the bf16 run's masters from its bf16 weights would differ at step 5
already. All eight runs are one-process runs and train in the test's process (train_tiny.main: one torch thread,
as a launched run; a launch's start-up costs more CPU than the 8 steps it runs), the resumes with torch.load
refused until they end.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from dist_scripts.train_tiny import main as train_tiny
from safetensors.torch import load_file
from torch import nn

from flowmatch.checkpoint import resume_checkpoint, save_checkpoint
from flowmatch.engine import DistributedConfig, Engine, OptimConfig

CONFIGS = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[tuple[int, str], Path]:
    """Each configuration's uninterrupted run (ROOT/ref) and its resume from step 4 (ROOT/resumed), by
    configuration: every reference, then every resume with torch.load refused (``--refuse-torch-load`` replaces
    torch.load; the monkeypatch puts it back afterwards)."""
    roots = {config: tmp_path_factory.mktemp(f"zero{config[0]}-{config[1]}") for config in CONFIGS}
    layouts = {config: ("--zero-stage", str(config[0]), "--precision", config[1]) for config in CONFIGS}
    for config in CONFIGS:
        train_tiny(["--run-dir", str(roots[config] / "ref"), *layouts[config]])
    for root in roots.values():
        shutil.copytree(root / "ref" / "checkpoints" / "4", root / "resumed" / "checkpoints" / "4")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(torch, "load", torch.load)
        patched.setattr(torch.serialization, "load", torch.serialization.load)
        for config in CONFIGS:
            train_tiny(["--run-dir", str(roots[config] / "resumed"), *layouts[config], "--refuse-torch-load"])
    assert torch.load is torch.serialization.load and torch.load.__module__ == "torch.serialization"
    return roots


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", CONFIGS, ids=[f"zero{s}-{p}" for s, p in CONFIGS])
def test_resume_under_a_refusing_torch_load_is_bit_identical(trained, stage, precision):
    root = trained[(stage, precision)]
    run = root / "resumed"
    ref, got = (json.loads((root / name / "result.json").read_text()) for name in ("ref", "resumed"))
    assert got["resumed_from"] == str(run / "checkpoints" / "4")
    assert {k: got["losses"][k] for k in ("5", "6", "7", "8")} == {k: ref["losses"][k] for k in ("5", "6", "7", "8")}
    assert got["lrs"] == {k: ref["lrs"][k] for k in got["lrs"]}
    ckpt, want = run / "checkpoints" / "8", root / "ref" / "checkpoints" / "8"
    for name in ("model.safetensors", "ema.safetensors", "state/rank00000.safetensors"):
        assert _same(load_file(ckpt / name), load_file(want / name)), name
    optim = load_file(ckpt / "state" / "rank00000.safetensors")
    assert any(k.endswith(".exp_avg_sq") for k in optim) and any(k.endswith(".step") for k in optim)
    # fp32 masters are saved only where they differ from the working weights (in model.safetensors already).
    assert (precision == "bf16") == any(k.startswith("optim.master.") for k in optim)
    # Nothing a run directory holds is a pickle.
    assert {p.suffix for p in run.rglob("*") if p.is_file()} == {".safetensors", ".json", ".yaml"}


def _engine_with_steps(seed: int, steps: int) -> Engine:
    """A one-process ZeRO-0 engine in this process, a small model, an EMA, and ``steps`` updates."""
    torch.manual_seed(seed)
    engine = Engine(DistributedConfig())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    engine.setup(model, model.parameters(), OptimConfig(lr=0.05, warmup_steps=0, schedule="constant"), max_steps=10,
                 micro_batch_size=4, grad_accum_steps=1)
    engine.init_ema(0.5)
    for _ in range(steps):
        engine.backward(engine.forward(torch.randn(4, 4)).pow(2).mean())
        assert engine.step().stepped
        engine.ema.update()
    return engine


def test_a_checkpoint_of_the_previous_format_resumes_without_its_pickles(tmp_path, monkeypatch, caplog):
    engine = _engine_with_steps(0, 1)
    ckpt = save_checkpoint(engine, tmp_path, 1, client_state={"step": 1}, recipe_yaml="", keep=1, ema=True)
    weights, ema = engine.model_state_dict(), engine.ema.state_dict()
    engine.shutdown()
    # What format 2 looked like: no manifest, DeepSpeed's pickled optimizer state, engine state format 1.
    (ckpt / "manifest.json").unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    layout = json.loads((ckpt / "state" / "engine.json").read_text())
    (ckpt / "state" / "engine.json").write_text(json.dumps({**layout, "format": 1}))
    rank0 = json.loads((ckpt / "state" / "rank00000.json").read_text())
    del rank0["optimizer"]
    (ckpt / "state" / "rank00000.json").write_text(json.dumps(rank0))
    (ckpt / "state" / "deepspeed").mkdir()
    (ckpt / "state" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"a pickle that could run code")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    engine = _engine_with_steps(1, 3)  # other weights, EMA and step count: all must come from the checkpoint
    with caplog.at_level(logging.WARNING):
        resumed = resume_checkpoint(engine, tmp_path)
    assert resumed.path == ckpt and resumed.client_state == {"step": 1}
    assert "written before checkpoints carried a manifest" in caplog.text
    assert "DeepSpeed's pickled files, which are never loaded" in caplog.text
    assert "AdamW moments restart from zero" in caplog.text
    got, got_ema = engine.model_state_dict(), engine.ema.state_dict()
    assert all(torch.equal(got[k], weights[k]) for k in weights) and all(torch.equal(got_ema[k], ema[k]) for k in ema)
    assert engine.optimizer_steps == 1
    engine.shutdown()
