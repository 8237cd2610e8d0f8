"""What real clusters do to a run's checkpoints, tried on real `flowmatch train` runs (1 process, CPU; the run that
meets a full disk is a process of its own, in a user namespace, the others train in this process).

- Damaged newest checkpoints (a truncated engine state file, a truncated weights file, a missing manifest):
  readers skip them and say so, `flowmatch check` names each file and exits 1, and the next `flowmatch train`
  resumes from the newest good checkpoint, says which ones it skipped and why, and sets them aside as
  ``<step>.damaged`` instead of pruning them.
- A full disk during a save (a real ENOSPC from a small tmpfs, mounted in a user namespace where the system
  allows it): the run stops with a message naming the directory and the bytes needed, the previous checkpoint
  verifies, and training resumes from it once there is space.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import clean_env

import flowmatch
from flowmatch.checkpoint import latest_checkpoint, load_weights, verify_checkpoint
from flowmatch.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _args(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "flowmatch", "train", str(ROOT / "recipes" / "digits.yaml"), f"run_dir={run_dir}",
            f"data.shards={shards}", "model.preset=tiny", "train.batch_size=8", "train.checkpoint_every=2",
            "optim.warmup_steps=0", "data.num_workers=0", "logging.tensorboard=false", "logging.progress=false",
            "sampling.per_prompt=1", "sampling.steps=2", "sampling.prompts=[a handwritten 3]", *overrides]


def _train_here(run_dir: Path, shards: Path, *overrides: str) -> int:
    """`flowmatch train` in this process (no interpreter start-up): its exit status."""
    return cli_main(_args(run_dir, shards, *overrides)[3:])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_damaged_newest_checkpoints_are_skipped_said_and_set_aside(tmp_path, digit_shards, caplog, capsys):
    run = tmp_path / "run"
    # Both runs train in this process (a launch costs seconds of start-up, and what is checked is what they say).
    assert _train_here(run, digit_shards, "train.max_steps=8", "train.keep_checkpoints=4") == 0
    capsys.readouterr()
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["2", "4", "6", "8"]
    (root / "8" / "manifest.json").unlink()
    _truncate(root / "6" / "model.safetensors")
    _truncate(root / "4" / "state" / "rank00000.safetensors")
    faults = {"8": "manifest.json: missing", "6": "model.safetensors: truncated: 100 bytes",
              "4": "state/rank00000.safetensors: truncated: 100 bytes"}

    # Readers take checkpoint 2, say why they skipped the others, and move nothing.
    with caplog.at_level(logging.WARNING):
        pipe = flowmatch.Pipeline.from_checkpoint(run)
    good = load_weights(root / "2")
    assert all(torch.equal(pipe.model.state_dict()[k], v) for k, v in good.items())
    for step, fault in faults.items():
        assert f"skipped damaged checkpoint {root / step}: {fault}" in caplog.text
    assert cli_main(["check", str(run)]) == 1
    report = capsys.readouterr().out
    assert all(fault in report for fault in faults.values()) and f"newest intact: {root / '2'}" in report

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train_here(run, digit_shards, "train.max_steps=10", "train.keep_checkpoints=4") == 0
    for step, fault in faults.items():
        assert f"skipping damaged checkpoint {root / step}: {fault}" in caplog.text
        assert f"Moved it to {root / (step + '.damaged')}" in caplog.text
    assert f"resuming from {root / '2'} (step 2)" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["10", "4", "4.damaged", "6", "6.damaged", "8", "8.damaged"]
    assert verify_checkpoint(root / "10") == [] and cli_main(["check", str(run)]) == 0


def _can_mount_a_tmpfs(where: Path) -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_stops_the_run_and_leaves_the_previous_checkpoint_loadable(tmp_path, digit_shards, capsys):
    mnt, kept = tmp_path / "small-disk", tmp_path / "copied"
    mnt.mkdir()
    if shutil.which("unshare") is None or not _can_mount_a_tmpfs(mnt):
        pytest.skip("no user namespaces here to mount a small tmpfs (the full-disk path is also tested with a "
                    "patched write in tests/test_checkpoint.py)")
    # A tiny checkpoint is ~6.5 MB: the step-2 checkpoint fits in 10 MB, the step-4 one cannot fit beside it.
    command = " ".join(f"'{a}'" for a in _args(mnt / "run", digit_shards, "train.max_steps=4",
                                              "train.keep_checkpoints=1", "train.ema_profiles=[]"))
    log = tmp_path / "full.log"
    script = (f"mount -t tmpfs -o size=10m tmpfs {mnt} && {command} > {log} 2>&1; code=$?; "
              f"cp -a {mnt}/run {kept}; exit $code")
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=clean_env(), timeout=300)
    out = log.read_text()
    assert proc.returncode == 1, out
    root, previous = mnt / "run" / "checkpoints", mnt / "run" / "checkpoints" / "2"
    manifest = json.loads((kept / "checkpoints" / "2" / "manifest.json").read_text())
    size = sum(e["bytes"] for e in manifest["files"].values())
    assert f"no space left on the device of {root} while writing checkpoint 4 (No space left on device)" in out
    assert f"({size:,} bytes, measured on {previous})" in out and f"The previous checkpoint {previous} is intact" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["2"]  # the unfinished save is gone
    assert verify_checkpoint(kept / "checkpoints" / "2") == [] and latest_checkpoint(kept) == kept / "checkpoints" / "2"
    capsys.readouterr()
    assert _train_here(kept, digit_shards, "train.max_steps=4", "train.keep_checkpoints=1") == 0
    assert f"resuming from {kept / 'checkpoints' / '2'} (step 2)" in capsys.readouterr().out
