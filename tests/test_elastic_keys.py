"""Exactly-once data across a change of layout, with real processes: a run trained on 2 processes, resumed on 1,
then on 3, trains on every sample of epoch 0 once, as an uninterrupted run does.

tests/dist_scripts/train_keys.py runs ``flowmatch train`` with each micro batch's keys and epochs written to a file
per rank. The global batch of 6 divides by 1, 2 and 3; 6 shards of 6 samples make an epoch of 6 steps. The legs stop
at steps 2 and 4 (mid-epoch, so each resume drains the previous layout's streams). After the second change the
saved 2-process stream still holding samples is finished by one of the 3 ranks (2 a step), so epoch 0 ends at step
10 and the last leg runs to it; the others meanwhile start epoch 1, which must hand out no sample twice either.
(tests/test_data_resume.py checks the same accounting with the ranks simulated in one process; this one goes through
the trainer, its checkpoints and torchrun.)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from dist_scripts.train_keys import record_keys, stamp_epochs
from launching import assert_succeeded, launch_jobs, torchrun
from PIL import Image

from flowmatch.cli import main as cli_main
from flowmatch.data.shardformat import ShardSink

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits.yaml"
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_keys.py"
SHARDS, PER_SHARD, GLOBAL_BATCH = 6, 6, 6
LEGS = [(2, 2), (1, 4), (3, 10)]  # (processes, train.max_steps): each leg resumes from the previous leg's checkpoint

pytestmark = pytest.mark.slow


def _write_shards(out: Path) -> list[str]:
    keys = []
    for i in range(SHARDS):
        with ShardSink(out, prefix=f"train{i:02d}", shard_size=PER_SHARD) as sink:
            for j in range(PER_SHARD):
                key = f"s{i}-{j}"
                image = io.BytesIO()
                Image.new("L", (8, 8), 40 * i + j).save(image, format="PNG")
                sink.write(key, {"png": image.getvalue(), "txt": f"a square of shade {i} {j}"})
                keys.append(key)
    return keys


def _overrides(run_dir: Path, shards: Path, max_steps: int) -> list[str]:
    return [str(RECIPE), f"run_dir={run_dir}", f"data.shards={shards}", "data.prepare=", "data.num_workers=0",
            "model.preset=tiny", f"train.max_steps={max_steps}", f"train.batch_size={GLOBAL_BATCH}",
            "train.checkpoint_every=2", "optim.warmup_steps=0", "train.ema_decay=0", "train.ema_profiles=[]",
            "logging.tensorboard=false", "logging.progress=false", "sampling.per_prompt=1", "sampling.steps=1",
            "sampling.prompts=[a square]"]


def _command(processes: int, keys_dir: Path, run_dir: Path, shards: Path, max_steps: int) -> list[str]:
    return torchrun("--standalone", "--nproc_per_node", str(processes), str(SCRIPT), str(keys_dir),
                    *_overrides(run_dir, shards, max_steps))


def _train_here(monkeypatch, caplog, keys_dir: Path, run_dir: Path, shards: Path, max_steps: int) -> str:
    """A one-process leg in this process (no launch start-up), recording its keys as train_keys.py does: what it
    printed and logged."""
    out = io.StringIO()
    caplog.clear()
    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING), contextlib.redirect_stdout(out):
        stamp_epochs(patched.setattr)
        record_keys(keys_dir, patched.setattr)
        assert cli_main(["train", *_overrides(run_dir, shards, max_steps)]) == 0
    return out.getvalue() + caplog.text


def _consumed(keys_dir: Path) -> tuple[dict[int, Counter], dict[int, int], int]:
    """The keys the ranks trained on by epoch (multisets), the samples trained on at each step, the rank files."""
    by_epoch: dict[int, Counter] = {}
    per_step: Counter = Counter()
    files = sorted(keys_dir.glob("rank*.jsonl"))
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key, epoch in zip(row["keys"], row["epochs"], strict=True):
                by_epoch.setdefault(epoch, Counter())[key] += 1
            per_step[row["step"]] += len(row["keys"])
    return by_epoch, dict(per_step), len(files)


def test_two_then_one_then_three_processes_train_on_each_sample_once(tmp_path, monkeypatch, caplog):
    shards = tmp_path / "shards"
    all_keys = _write_shards(shards)
    run, whole = tmp_path / "run", tmp_path / "whole"
    legs = [tmp_path / f"keys-{i}-{n}proc" for i, (n, _) in enumerate(LEGS)]
    # The one-process runs (the uninterrupted one, the middle leg) train in this process; the others are torchrun
    # jobs of train_keys.py.
    _train_here(monkeypatch, caplog, tmp_path / "keys-whole", whole, shards, LEGS[-1][1])
    for i, (processes, max_steps) in enumerate(LEGS):
        if processes == 1:
            out = _train_here(monkeypatch, caplog, legs[i], run, shards, max_steps)
        else:
            log = tmp_path / f"leg{i}.log"
            job = ([_command(processes, legs[i], run, shards, max_steps)], [log])
            assert_succeeded(launch_jobs({"leg": job})["leg"])
            out = log.read_text()
        if i == 0:
            continue
        assert f"resuming from {run / 'checkpoints' / str(LEGS[i - 1][1])}" in out
        assert "no sample is skipped or repeated" in out  # the change of layout was taken as an elastic one

    want, want_steps, _ = _consumed(tmp_path / "keys-whole")
    assert want[0] == Counter(all_keys)  # the uninterrupted run: epoch 0 holds each sample once
    got: dict[int, Counter] = {}
    steps: dict[int, int] = {}
    first = 1
    for leg, (processes, max_steps) in zip(legs, LEGS):
        leg_keys, leg_steps, files = _consumed(leg)
        assert files == processes
        assert sorted(leg_steps) == list(range(first, max_steps + 1))  # each leg trained its own steps, once
        first = max_steps + 1
        for epoch, keys in leg_keys.items():
            got[epoch] = got.get(epoch, Counter()) + keys
        steps.update(leg_steps)
    assert steps == want_steps == {s: GLOBAL_BATCH for s in range(1, LEGS[-1][1] + 1)}
    duplicates = sum(n - 1 for n in got[0].values() if n > 1)
    missing = sum(1 for k in all_keys if k not in got[0])
    print(f"epoch 0: {sum(got[0].values())} samples, {len(got[0])} distinct, duplicates {duplicates}, "
          f"missing {missing}; epoch 1: {sum(got[1].values())} samples, {len(got[1])} distinct")
    assert (duplicates, missing) == (0, 0)
    assert got[0] == want[0]
    assert sorted(got) == [0, 1] and max(got[1].values()) == 1 and set(got[1]) <= set(all_keys)
