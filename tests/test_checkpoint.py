"""Checkpoint directories: layout, the manifest, atomic writes, pruning, stale leftovers, kills mid-write, a full
disk, path resolution.

A single-process stand-in for the engine keeps these tests fast; the real engine's state is exercised by the
one-process engine tests and the multi-process runs of tests/test_engine.py (SIGKILL mid-save and bit-identical
resume included), tests/test_resume_without_pickles.py and tests/test_preemption.py. Verification, fallback and
quarantine are in tests/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import flowmatch.checkpoint.save as checkpoint_save
from flowmatch.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_recipe_yaml,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "run_dir: runs/x\ntrain:\n  max_steps: 10\n"


class FakeEngine:
    """The checkpoint-facing part of flowmatch.engine.Engine for one process, without DeepSpeed."""

    is_main = True
    rank = 0
    world_size = 1

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight
        self.loaded: dict[str, Any] = {}

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def save(self, directory: str | os.PathLike[str], client_state: dict) -> list[Path]:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "client.json").write_text(json.dumps(client_state))
        return [Path(directory) / "client.json"]

    def load(self, directory, *, weights, ema=None, elastic=True) -> dict:
        self.loaded = {"directory": Path(directory), "weights": weights, "ema": ema}
        return json.loads((Path(directory) / "client.json").read_text())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.full((2, 3), self.weight), "b": torch.zeros(3)}

    @property
    def ema(self) -> FakeEma:
        return FakeEma(self.weight / 2)


class FakeEma:
    """The checkpoint-facing part of flowmatch.engine.ema.Ema."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.full((2, 3), self.weight), "b": torch.zeros(3)}


def _save(engine: FakeEngine, run_dir: Path, step: int, keep: int = 3, ema: bool = True) -> Path:
    return save_checkpoint(engine, run_dir, step, client_state={"step": step}, recipe_yaml=RECIPE, keep=keep, ema=ema)


def test_layout_contents_and_readers(tmp_path):
    ckpt = _save(FakeEngine(3.0), tmp_path, 5)
    assert ckpt == tmp_path / "checkpoints" / "5"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "manifest.json", "meta.json",
                                                      "model.safetensors", "recipe.yaml", "state"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]  # no temporary left
    meta = read_meta(tmp_path)
    assert (meta.step, meta.ema, meta.format_version) == (5, True, 3)
    assert "zero_stage" not in json.loads((ckpt / "meta.json").read_text())  # the engine state records the layout
    assert torch.equal(load_weights(ckpt)["w"], torch.full((2, 3), 1.5))  # EMA when present
    assert torch.equal(load_weights(tmp_path, ema=False)["w"], torch.full((2, 3), 3.0))
    assert load_recipe_yaml(tmp_path) == RECIPE
    engine = FakeEngine()
    assert load_checkpoint(engine, tmp_path) == {"step": 5}
    assert engine.loaded == {"directory": ckpt / "state", "weights": ckpt / "model.safetensors",
                             "ema": ckpt / "ema.safetensors"}


def test_the_manifest_lists_every_other_file_with_its_size_and_sha256(tmp_path):
    ckpt = _save(FakeEngine(), tmp_path, 5)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in on_disk if name != "manifest.json"]
    assert (manifest["step"], manifest["hash"]) == (5, "sha256")
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0}, name
    assert verify_checkpoint(ckpt) == []


def test_the_manifest_is_written_last(tmp_path, monkeypatch):
    # Fails if the manifest were written before the other files: a kill in between would leave a checkpoint
    # that looks complete. Every other file is on disk when it is written.
    seen = []
    real = checkpoint_save.write_manifest

    def spy(ckpt, step, files):
        seen.append(sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()))
        return real(ckpt, step, files)

    monkeypatch.setattr(checkpoint_save, "write_manifest", spy)
    _save(FakeEngine(), tmp_path, 1)
    assert seen == [sorted(["ema.safetensors", "meta.json", "model.safetensors", "recipe.yaml",
                            "state/client.json"])]


@pytest.mark.parametrize("ema_default, want", [(True, 1.5), (False, 3.0), (None, 1.5)])
def test_the_default_weights_are_those_validation_chose(tmp_path, ema_default, want):
    """Bug caught: the verdict of validation not recorded, or load_weights ignoring it; ema=True/False still force."""
    engine = FakeEngine(weight=3.0)
    ckpt = save_checkpoint(engine, tmp_path, 1, client_state={}, recipe_yaml=RECIPE, keep=1, ema=True,
                           ema_default=ema_default)
    assert read_meta(ckpt).ema_default is ema_default
    assert torch.equal(load_weights(ckpt)["w"], torch.full((2, 3), want))
    assert torch.equal(load_weights(ckpt, ema=True)["w"], torch.full((2, 3), 1.5))
    assert torch.equal(load_weights(ckpt, ema=False)["w"], torch.full((2, 3), 3.0))


def test_without_ema(tmp_path):
    ckpt = _save(FakeEngine(), tmp_path, 1, ema=False)
    assert not (ckpt / "ema.safetensors").exists() and not read_meta(ckpt).ema
    assert torch.equal(load_weights(ckpt)["w"], torch.ones(2, 3))  # ema=None falls back to the raw weights
    with pytest.raises(FileNotFoundError, match="no ema.safetensors.*ema=False"):
        load_weights(ckpt, ema=True)
    engine = FakeEngine()
    load_checkpoint(engine, ckpt)
    assert engine.loaded["ema"] is None


def test_keeps_the_newest_k(tmp_path):
    engine = FakeEngine()
    for step in (10, 20, 30, 40, 50):
        _save(engine, tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["40", "50"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "50"
    with pytest.raises(ValueError, match="keep must be >= 1"):
        _save(engine, tmp_path, 60, keep=0)


def test_steps_order_numerically_and_resaving_a_step_replaces_it(tmp_path):
    _save(FakeEngine(1.0), tmp_path, 9)
    _save(FakeEngine(1.0), tmp_path, 10)
    assert latest_checkpoint(tmp_path).name == "10"  # not "9", which sorts after "10" as text
    _save(FakeEngine(7.0), tmp_path, 10)
    assert torch.equal(load_weights(tmp_path, ema=False)["w"], torch.full((2, 3), 7.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "9"]


def test_stale_and_incomplete_directories_are_ignored_then_cleaned(tmp_path):
    _save(FakeEngine(), tmp_path, 3)
    root = tmp_path / "checkpoints"
    (root / ".tmp-7-deadbeef" / "state").mkdir(parents=True)  # a save killed mid-write
    (root / ".tmp-7-deadbeef" / "model.safetensors").write_bytes(b"\x00" * 10)
    (root / "8").mkdir()  # a step-named directory without a manifest (a copy that stopped, say)
    assert latest_checkpoint(tmp_path) == root / "3"
    with pytest.raises(CheckpointError, match="8 is damaged and cannot be used: manifest.json: missing"):
        resolve_checkpoint(root / "8")
    _save(FakeEngine(), tmp_path, 4)
    assert sorted(p.name for p in root.iterdir()) == ["3", "4", "8"]  # the .tmp-* is gone, the unfinished 8 kept


class _FailingEngine(FakeEngine):
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        raise OSError("disk full")


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    _save(FakeEngine(2.0), tmp_path, 1)
    with pytest.raises(OSError, match="disk full"):
        _save(_FailingEngine(), tmp_path, 2)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "1"
    assert torch.equal(load_weights(tmp_path, ema=False)["w"], torch.full((2, 3), 2.0))


def test_a_full_disk_stops_with_the_directory_and_the_bytes_needed(tmp_path, monkeypatch):
    previous = _save(FakeEngine(2.0), tmp_path, 1)
    size = sum(e["bytes"] for e in json.loads((previous / "manifest.json").read_text())["files"].values())
    real = checkpoint_save.write_safetensors

    def fill_disk(path, tensors, metadata=None):
        if path.name == "ema.safetensors":  # the model file is written already: the save is half done
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_save, "write_safetensors", fill_disk)
    with pytest.raises(CheckpointError) as err:
        _save(FakeEngine(5.0), tmp_path, 2)
    message = str(err.value)
    root = tmp_path / "checkpoints"
    assert message.startswith(f"no space left on the device of {root} while writing checkpoint 2")
    assert f"({size:,} bytes, measured on {previous})" in message and "are free" in message
    assert f"The previous checkpoint {previous} is intact" in message and "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["1"]  # the unfinished save was removed to give space back
    assert verify_checkpoint(previous) == [] and latest_checkpoint(tmp_path) == previous
    assert torch.equal(load_weights(tmp_path, ema=False)["w"], torch.full((2, 3), 2.0))


def test_a_full_disk_on_the_first_save_says_what_it_had_written(tmp_path, monkeypatch):
    def fill_disk(path, tensors, metadata=None):
        path.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_save, "write_safetensors", fill_disk)
    with pytest.raises(CheckpointError, match=re.escape("It had written 1011 B (1,011 bytes) when the disk filled")):
        _save(FakeEngine(), tmp_path, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


_KILLED_SAVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_checkpoint import FakeEngine, _save

class Slow(FakeEngine):
    def model_state_dict(self):
        Path({marker!r}).write_text("writing")  # state/ is on disk, the safetensors files are next
        time.sleep(60)
        return super().model_state_dict()

_save(FakeEngine(1.0), Path({run_dir!r}), 1)
_save(Slow(5.0), Path({run_dir!r}), 2)
"""


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    marker, run_dir = tmp_path / "marker", tmp_path / "run"
    code = _KILLED_SAVER.format(tests=str(ROOT / "tests"), marker=str(marker), run_dir=str(run_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the saver stopped before writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    root = run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names[0].startswith(".tmp-2-") and names[1:] == ["1"]
    assert (root / names[0] / "state" / "client.json").exists()  # it really was killed half-way
    assert latest_checkpoint(run_dir) == root / "1"
    assert torch.equal(load_weights(run_dir)["w"], torch.full((2, 3), 0.5))
    assert load_file(root / "1" / "model.safetensors")["w"][0, 0].item() == 1.0


def test_resolve_checkpoint_accepts_runs_checkpoints_and_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: expected a run directory"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(tmp_path / "empty")
    assert str(err.value) == (f"no checkpoint under {tmp_path / 'empty'}: train first or point at "
                              "RUN_DIR/checkpoints/<step>")
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_weights(tmp_path / "empty")
    run = tmp_path / "run"
    _save(FakeEngine(), run, 2)
    _save(FakeEngine(), run, 4)
    assert resolve_checkpoint(run) == run / "checkpoints" / "4"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "4"
    assert resolve_checkpoint(run / "checkpoints" / "2") == run / "checkpoints" / "2"
    assert latest_checkpoint(tmp_path / "empty") is None
