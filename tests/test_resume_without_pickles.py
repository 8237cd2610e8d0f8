"""Resuming reads no pickle, and is bit-identical, under ZeRO 0, 2 and 3 (fp32, and ZeRO-2 in bf16, where the fp32
masters differ from the working weights).

For each configuration tests/dist_scripts/train_tiny.py trains 8 steps in one process (checkpoints at 4 and 8);
its step-4 checkpoint is copied into a fresh run directory and resumed to step 8 by a process in which
``torch.load`` raises whatever it is given. The resumed run must end bit-identical to the uninterrupted one:
losses of steps 5-8, weights, EMA and the saved optimizer state (fp32 masters, AdamW moments and steps). A
resume that restored only the weights (moments from zero) or rebuilt the bf16 run's masters from its bf16
weights would differ at step 5 already. Each configuration takes two launches of ~6 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from launching import launch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_tiny.py"

pytestmark = pytest.mark.slow

CONFIGS = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")]


def _train(run_dir: Path, log: Path, *args: str) -> dict:
    (code,), _ = launch([[sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *args]], [log])
    assert code == 0, log.read_text()
    return json.loads((run_dir / "result.json").read_text())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, precision", CONFIGS, ids=[f"zero{s}-{p}" for s, p in CONFIGS])
def test_resume_under_a_refusing_torch_load_is_bit_identical(tmp_path, stage, precision):
    layout = ("--zero-stage", str(stage), "--precision", precision)
    ref = _train(tmp_path / "ref", tmp_path / "ref.log", *layout)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "4", run / "checkpoints" / "4")
    got = _train(run, tmp_path / "resumed.log", *layout, "--refuse-torch-load")
    assert got["resumed_from"] == str(run / "checkpoints" / "4")
    assert {k: got["losses"][k] for k in ("5", "6", "7", "8")} == {k: ref["losses"][k] for k in ("5", "6", "7", "8")}
    assert got["lrs"] == {k: ref["lrs"][k] for k in got["lrs"]}
    ckpt, want = run / "checkpoints" / "8", tmp_path / "ref" / "checkpoints" / "8"
    for name in ("model.safetensors", "ema.safetensors", "state/rank00000.safetensors"):
        assert _same(load_file(ckpt / name), load_file(want / name)), name
    optim = load_file(ckpt / "state" / "rank00000.safetensors")
    assert any(k.endswith(".exp_avg_sq") for k in optim) and any(k.endswith(".step") for k in optim)
    # fp32 masters are saved only where they differ from the working weights (in model.safetensors already).
    assert (precision == "bf16") == any(k.startswith("optim.master.") for k in optim)
    # Nothing a run directory holds is a pickle.
    assert {p.suffix for p in run.rglob("*") if p.is_file()} == {".safetensors", ".json", ".yaml"}
