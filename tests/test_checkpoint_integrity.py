"""Verification against the manifest, fallback to the newest checkpoint that verifies, quarantine, checkpoints of
the previous format, and `flowmatch check` (one process, a stand-in engine: fast).

The same faults against real training processes are in tests/test_resume_faults.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoint import FakeEngine, _save

from flowmatch.checkpoint import (
    CheckpointError,
    Damage,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_meta,
    resolve_checkpoint,
    select_for_resume,
    verify_checkpoint,
)
from flowmatch.cli import main as cli_main


def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of a tensor: same size, other content
    path.write_bytes(bytes(data))


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _save(FakeEngine(1.0), run, 2)
    _save(FakeEngine(2.0), run, 4)
    return run


# (what is done to checkpoint 4, the file named, words of the problem)
FAULTS = [
    ("truncated state file", lambda c: _truncate(c / "state" / "client.json", 3), "state/client.json",
     "truncated: 3 bytes, the manifest says"),
    ("truncated weights", lambda c: _truncate(c / "model.safetensors"), "model.safetensors", "truncated: 20 bytes"),
    ("flipped byte", lambda c: _flip_a_byte(c / "model.safetensors"), "model.safetensors",
     "content differs from the manifest"),
    ("missing file", lambda c: (c / "recipe.yaml").unlink(), "recipe.yaml", "missing"),
    ("manifest missing", lambda c: (c / "manifest.json").unlink(), "manifest.json", "missing: the save or the copy"),
    ("manifest cut short", lambda c: _truncate(c / "manifest.json", 30), "manifest.json", "unreadable"),
]


@pytest.mark.parametrize("fault, damage, file, words", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_is_named_and_readers_fall_back(tmp_path, caplog, fault, damage, file, words):
    run = _run(tmp_path)
    newest = run / "checkpoints" / "4"
    damage(newest)
    found = verify_checkpoint(newest)
    assert [d.file for d in found] == [file] and words in found[0].problem, found
    # Named explicitly: one paragraph naming the checkpoint, the file and what is wrong, and what to use instead.
    with pytest.raises(CheckpointError) as err:
        load_weights(newest, ema=False)
    message = str(err.value)
    assert message.startswith(f"checkpoint {newest} is damaged and cannot be used: {file}: ")
    assert words in message and f"flowmatch check {run}" in message and "\n" not in message
    # Through the run directory: the previous checkpoint, with a warning naming the one skipped and why.
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_weights(run, ema=False)["w"], torch.ones(2, 3))
    assert f"skipped damaged checkpoint {newest}: {file}: " in caplog.text
    assert newest.is_dir()  # readers change nothing in the run directory


def test_readers_hash_the_files_they_read(tmp_path):
    # A flipped byte keeps the size: only the reader that reads (and so hashes) that file sees it. Fails if
    # readers hashed nothing (they would take checkpoint 4's damaged raw weights).
    run = _run(tmp_path)
    _flip_a_byte(run / "checkpoints" / "4" / "model.safetensors")
    assert torch.equal(load_weights(run, ema=False)["w"], torch.ones(2, 3))  # fell back to 2
    assert torch.equal(load_weights(run, ema=True)["w"], torch.full((2, 3), 1.0))  # 4's EMA is intact
    assert resolve_checkpoint(run) == run / "checkpoints" / "4"  # sizes only: nothing read
    assert [d.file for d in verify_checkpoint(run / "checkpoints" / "4")] == ["model.safetensors"]


def test_resume_quarantines_damaged_checkpoints_and_says_so(tmp_path, caplog):
    run = _run(tmp_path)
    root = run / "checkpoints"
    _truncate(root / "4" / "state" / "client.json", 3)
    with caplog.at_level(logging.WARNING):
        assert select_for_resume(FakeEngine(), run) == root / "2"
    assert sorted(p.name for p in root.iterdir()) == ["2", "4.damaged"]
    assert f"skipping damaged checkpoint {root / '4'}: state/client.json: truncated" in caplog.text
    assert f"Moved it to {root / '4.damaged'}" in caplog.text
    note = (root / "4.damaged" / "DAMAGED.txt").read_text()
    assert "state/client.json: truncated: 3 bytes, the manifest says" in note
    # A later save of step 4 takes the name back; the quarantined copy stays, out of pruning's reach.
    _save(FakeEngine(3.0), run, 4, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["4", "4.damaged"]
    # load_checkpoint on a run directory resumes the same way; on a damaged checkpoint it refuses.
    assert load_checkpoint(FakeEngine(), run) == {"step": 4}
    _truncate(root / "4" / "ema.safetensors")
    with pytest.raises(CheckpointError, match="4 is damaged and cannot be used: ema.safetensors: truncated"):
        load_checkpoint(FakeEngine(), root / "4")


def test_resume_refuses_to_start_over_when_every_checkpoint_is_damaged(tmp_path):
    run = _run(tmp_path)
    root = run / "checkpoints"
    for step in ("2", "4"):
        (root / step / "manifest.json").unlink()
    for _ in range(2):  # the second time nothing but the quarantined ones is left: still no silent restart
        with pytest.raises(CheckpointError, match="no intact checkpoint to resume from .* 2.damaged, 4.damaged"):
            select_for_resume(FakeEngine(), run)
    assert select_for_resume(FakeEngine(), tmp_path / "fresh") is None  # a new run starts from scratch


def _as_previous_format(ckpt: Path) -> None:
    """What a checkpoint of format 2 looked like: no manifest, meta.json format 2."""
    (ckpt / "manifest.json").unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))


def test_checkpoints_of_the_previous_format_load_with_a_warning(tmp_path, caplog):
    run = _run(tmp_path)
    newest = run / "checkpoints" / "4"
    _as_previous_format(newest)
    assert latest_checkpoint(run) == newest
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_weights(run, ema=False)["w"], torch.full((2, 3), 2.0))
        assert read_meta(newest).format_version == 2
    assert "was written before checkpoints carried a manifest" in caplog.text
    # Without hashes they are still checked for completeness: a truncated safetensors file is seen.
    _truncate(newest / "model.safetensors", 170)  # the header and part of the tensors
    assert verify_checkpoint(newest) == [Damage("model.safetensors", verify_checkpoint(newest)[0].problem)]
    assert "its header describes" in verify_checkpoint(newest)[0].problem
    assert torch.equal(load_weights(run, ema=False)["w"], torch.ones(2, 3))


def test_meta_of_the_first_format_still_reads(tmp_path):
    ckpt = _save(FakeEngine(), tmp_path, 3)
    (ckpt / "manifest.json").unlink()
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "world_size": 2, "zero_stage": 3, "precision": "bf16",
                                                "ema": True, "created": 1.0, "format_version": 1,
                                                "flowmatch_version": "0.1.0"}))
    meta = read_meta(ckpt)
    assert (meta.step, meta.ema, meta.format_version) == (3, True, 1)


def test_flowmatch_check_lists_every_checkpoint_and_fails_when_the_newest_is_damaged(tmp_path, capsys):
    run = _run(tmp_path)
    root = run / "checkpoints"
    assert cli_main(["check", str(run)]) == 0
    out = capsys.readouterr().out
    assert [(line.split()[0], line.split()[-1]) for line in out.splitlines()[:2]] == [("2", "complete"),
                                                                                      ("4", "complete")]
    assert f"newest intact: {root / '4'}" in out
    (root / ".tmp-6-0badc0de").mkdir()  # a save that was killed
    shutil.copytree(root / "2", root / "1")
    _truncate(root / "1" / "model.safetensors")
    _flip_a_byte(root / "4" / "ema.safetensors")
    assert cli_main(["check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "1  " in out and "model.safetensors: truncated: 20 bytes" in out
    assert "ema.safetensors: content differs from the manifest" in out
    assert ".tmp-6-0badc0de" in out and "unfinished" in out and f"newest intact: {root / '2'}" in out
    select_for_resume(FakeEngine(), run)  # quarantines 4
    assert cli_main(["check", str(run)]) == 0  # the newest step directory, 2, is intact
    out = capsys.readouterr().out
    assert "4.damaged" in out and "quarantined" in out and "ema.safetensors: content differs" in out
    assert cli_main(["check", str(tmp_path / "nowhere")]) == 1
    assert "has no checkpoints/ folder" in capsys.readouterr().err
