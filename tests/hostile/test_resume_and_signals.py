"""Hostile inputs around resume and signals: a changed recipe on resume, a stop signal with post-hoc EMA profiles,
a damaged EMA snapshot, Ctrl-C, a diverging run. Each test failed on the code before its fix."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowmatch.checkpoint import check_run, format_check
from flowmatch.checkpoint.manifest import sha256_file
from flowmatch.config import Recipe, load_recipe, to_yaml
from flowmatch.engine.optim import lr_factor
from flowmatch.models.lora import LoraConfig
from flowmatch.posthoc import list_snapshots, reconstruct_ema
from flowmatch.training import train
from flowmatch.training.loop import TrainingError
from flowmatch.training.resume_policy import classify, compare_recipes, flatten
from tests.launching import LAUNCH_TIMEOUT_S
from tests.test_preemption import fit_with_sigusr1_during_step_three

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.hostile


def tiny(run_dir: Path, shards: Path, **extra) -> Recipe:
    """The digits recipe at the tiny preset: a few CPU steps."""
    overrides = {
        "run_dir": str(run_dir), "data.shards": str(shards), "model.preset": "tiny", "train.max_steps": 2,
        "train.batch_size": 8, "train.checkpoint_every": 2, "train.log_every": 1, "optim.warmup_steps": 1,
        "data.num_workers": 0, "logging.tensorboard": False, "logging.progress": False,
        "sampling.per_prompt": 1, "sampling.steps": 1, "sampling.prompts": ["a handwritten 3"],
        "train.ema_snapshot_every": 0, **extra,
    }
    return load_recipe(ROOT / "recipes" / "digits.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ 3: a changed recipe on resume


def test_a_safe_change_on_resume_takes_effect_and_is_said(tmp_path, digit_shards, capsys):
    """Bugs caught: the saved schedule's peak lr kept over the recipe's (the old silent ignore); the change not
    said."""
    run = tmp_path / "run"
    train(tiny(run, digit_shards))
    capsys.readouterr()
    recipe = tiny(run, digit_shards, **{"optim.lr": 0.01, "train.max_steps": 4})
    train(recipe)
    assert "changed on resume: optim.lr 0.003 -> 0.01" in capsys.readouterr().out
    logged = {m["step"]: m["lr"] for m in metrics(run) if "lr" in m}
    # The lr logged after step 3 is the one the next update uses: the new peak at the schedule's position.
    assert logged[3] == pytest.approx(0.01 * lr_factor(3, optim=recipe.optim, max_steps=4), rel=1e-6)
    saved = yaml.safe_load((run / "checkpoints" / "4" / "recipe.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01  # the recorded recipe is what ran


def test_an_architecture_change_on_resume_is_refused_naming_the_key_and_both_values(tmp_path, digit_shards):
    """Bug caught: a shape-mismatch traceback from deep in the engine (the old behaviour), or a refusal that does
    not say which key."""
    run = tmp_path / "run"
    train(tiny(run, digit_shards))
    with pytest.raises(TrainingError) as err:
        train(tiny(run, digit_shards, **{"model.depth": 3, "distributed.precision": "bf16", "optim.lr": 0.01}))
    message = str(err.value)
    assert "model.depth 2 -> 3" in message and "distributed.precision 'fp32' -> 'bf16'" in message
    assert "optim.lr" not in message  # a safe change is not part of the refusal


def test_every_recipe_key_is_classified_and_an_unknown_one_is_refused():
    """Bug caught: a new recipe key that nobody classified (it would be refused on every resume that changes it)."""
    trees = [yaml.safe_load(to_yaml(recipe)) for recipe in (Recipe(), load_recipe(ROOT / "recipes" / "digits.yaml"))]
    trees.append({"model": {"lora": dataclasses.asdict(LoraConfig())}})  # the keys of an optional section
    keys = {k for tree in trees for k, _ in flatten(tree)}
    assert [k for k in sorted(keys) if classify(k) is None] == []
    changes = compare_recipes({"train": {"brand_new": 1}}, {"train": {"brand_new": 2}})
    assert [(c.key, c.safe) for c in changes] == [("train.brand_new", False)]


# ------------------------------------------------------------------------ 4: a stop signal keeps the EMA profiles


def test_the_stop_checkpoint_carries_the_ema_profiles(tmp_path, digit_shards, capsys):
    """Bug caught: the checkpoint written on SIGTERM/SIGUSR1 without a snapshot, so resume restarts the post-hoc EMA
    profiles at the stop step."""
    run_dir = tmp_path / "run"
    summary = fit_with_sigusr1_during_step_three(
        tiny(run_dir, digit_shards, **{"train.max_steps": 6, "train.checkpoint_every": 100}))
    assert (summary.preempted, summary.final_step) == (True, 3)
    assert [s.step for s in list_snapshots(run_dir)] == [3]
    capsys.readouterr()
    train(tiny(run_dir, digit_shards, **{"train.max_steps": 4, "train.checkpoint_every": 100}))
    out = capsys.readouterr().out
    assert "EMA profiles restored from" in out and "start over" not in out
    assert [(s.step, s.updates) for s in list_snapshots(run_dir)] == [(3, 3), (4, 4)]


# ------------------------------------------------------------------------------------- 5: a damaged EMA snapshot


def test_a_damaged_old_snapshot_is_quarantined_and_resume_and_ema_go_on(tmp_path, digit_shards, caplog):
    """Bugs caught: a snapshot whose header is damaged makes resume (and `flowmatch ema`) a traceback; `flowmatch
    check` says nothing of it; a bit flip in a snapshot goes unseen (no manifest)."""
    run = tmp_path / "run"
    train(tiny(run, digit_shards, **{"train.max_steps": 6, "train.keep_checkpoints": 1}))
    snaps = run / "ema" / "snapshots"
    assert sorted(p.name for p in snaps.glob("*.safetensors")) == ["2.safetensors", "4.safetensors", "6.safetensors"]
    with open(snaps / "2.safetensors", "r+b") as f:  # the header's length field: garbage
        f.write(b"\xff" * 8)
    with open(snaps / "4.safetensors", "r+b") as f:  # one byte of the weights, the size unchanged
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    report = format_check(check_run(run))
    assert "ema/snapshots/2.safetensors" in report and "ema/snapshots/4.safetensors" in report
    assert report.count("damaged") >= 2 and "SHA-256 mismatch" in report

    caplog.set_level("WARNING")
    summary = train(tiny(run, digit_shards, **{"train.max_steps": 8, "train.keep_checkpoints": 1}))
    assert summary.final_step == 8
    assert any("2.safetensors is damaged" in r.getMessage() for r in caplog.records)
    assert (snaps / "2.safetensors.damaged").is_file() and not (snaps / "2.safetensors").exists()
    made = reconstruct_ema(run, [0.08])  # hashes every snapshot: the flipped one goes too
    assert (snaps / "4.safetensors.damaged").is_file() and made[0].snapshots == 2  # steps 6 and 8
    statuses = check_run(run)
    assert sorted(s.path.name for s in statuses if s.state == "quarantined") == [
        "2.safetensors.damaged", "4.safetensors.damaged"]


# ---------------------------------------------------------------------------------------------------- Ctrl-C


def _cli_overrides(run_dir: Path, shards: Path, **extra) -> list[str]:
    overrides = {
        "run_dir": str(run_dir), "data.shards": str(shards), "model.preset": "tiny", "train.batch_size": 8,
        "train.log_every": 1, "optim.warmup_steps": 1, "data.num_workers": 0, "logging.tensorboard": False,
        "logging.progress": False, "sampling.per_prompt": 1, "sampling.steps": 1,
        "sampling.prompts": ["a handwritten 3"], **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was interrupted"
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                  for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout_s} s")


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130_with_no_traceback(tmp_path, digit_shards):
    """Bug caught: KeyboardInterrupt caught by the engine's failure guard (a traceback, status 1, no checkpoint)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "flowmatch", "train", str(ROOT / "recipes" / "digits.yaml"),
           *_cli_overrides(run_dir, digit_shards, **{"train.max_steps": 10_000, "train.checkpoint_every": 10_000})]
    # Output to a file, not a pipe nobody reads until the end (a full pipe would block the run before step 2).
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    try:
        _wait_for_step(proc, run_dir, 2, timeout_s=LAUNCH_TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "flowmatch train: interrupted at step" in err
    ckpts = [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(ckpts) == 1 and int(ckpts[0].name) >= 2


# ------------------------------------------------------------------------------------------------ a diverging run


def test_a_diverging_run_warns_then_stops_with_a_clear_message(tmp_path, digit_shards, capsys):
    """Bugs caught: a run whose loss grows by orders of magnitude (finite all along) ending with status 0 and no
    warning; a stop before train.max_bad_windows bad windows; a message that does not say what to do."""
    recipe = tiny(tmp_path / "run", digit_shards, **{
        "optim.lr": 1e6, "optim.warmup_steps": 0, "train.max_steps": 30,
        "train.log_every": 3, "train.max_bad_windows": 2, "train.checkpoint_every": 100})
    # The first window already diverged (against its own first step's loss), the second stops the run.
    with pytest.raises(TrainingError, match=r"step 6: the run is diverging: the loss .* times its lowest .*2 log "
                                            r"windows in a row .* Lower optim.lr"):
        train(recipe)
    out = capsys.readouterr().out
    assert "warning: step 3: the run is diverging" in out and "1 bad log window(s) in a row" in out


def test_a_key_added_since_the_checkpoint_takes_its_default_and_is_no_change(tmp_path, digit_shards, capsys):
    """Bug caught: a checkpoint written before a recipe key existed refused (or reported as changed) because the
    key is absent from its recipe.yaml."""
    run = tmp_path / "run"
    train(tiny(run, digit_shards))
    ckpt = run / "checkpoints" / "2"
    saved = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    del saved["model"]["qk_norm"], saved["train"]["max_bad_steps"]  # as if written before these keys existed
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(saved))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["recipe.yaml"].update(bytes=(ckpt / "recipe.yaml").stat().st_size,
                                            sha256=sha256_file(ckpt / "recipe.yaml"))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train(tiny(run, digit_shards, **{"train.max_steps": 3})).final_step == 3
    out = capsys.readouterr().out
    assert "changed on resume: train.max_steps 2 -> 3" in out and "qk_norm" not in out and "max_bad_steps" not in out
