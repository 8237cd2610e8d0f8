"""Preemption: SIGTERM (or SIGUSR1) makes every rank finish the current optimizer step, write a checkpoint and exit
0; the same command then resumes bit-identically.

Fast: the signal handler itself (a request, repeats delivered together, a second SIGTERM that exits at once).
Slow: a real 2-process ZeRO-2 ``flowmatch train`` run (two bare processes given RANK/WORLD_SIZE, so that each
rank's exit status is seen) receives SIGTERM on rank 1 only, mid-training; both ranks must stop at the same step,
write one checkpoint with both ranks' state and exit 0; running the command again must end bit-identical (fp32)
to an uninterrupted run: losses, weights, EMA and both ranks' optimizer state. The uninterrupted run is the
session's 2-process ZeRO-2 run of tests/test_train_distributed.py (``train_runs.zero2``: the same settings, another
launcher of the same environment variables), so this module shares its worker (tests/conftest.py). The time from
SIGTERM to the last exit is printed (run with -s to see it): on the shared 2-core CI machine the step and the
checkpoint take under a second, and interpreter teardown of two processes takes most of the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launching import clean_env, free_port
from safetensors.torch import load_file
from test_train_distributed import CHECKPOINT_EVERY, STEPS, _train_args

import flowmatch.training.preemption as preemption
from flowmatch.checkpoint import read_meta, verify_checkpoint
from flowmatch.training.preemption import Preemption

ROOT = Path(__file__).resolve().parents[1]
SIGNAL_AT_STEP = 1  # rank 1 is signalled once rank 0 has logged this step
EXIT_WITHIN_S = 90  # a step, a checkpoint and teardown: measured 2-11 s on the shared 2-core CI machine


# ------------------------------------------------------------------------------------------------- the handler


class _Exited(Exception):
    pass


def test_a_signal_asks_for_a_stop_repeats_together_count_once_a_later_sigterm_exits(monkeypatch, capfd):
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(preemption.os, "_exit", fake_exit)
    with Preemption(rank=3) as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        assert "[flowmatch rank 3] received SIGTERM: finishing the current optimizer step" in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded by a launcher at the same moment: the same request
        os.kill(os.getpid(), signal.SIGUSR1)
        assert codes == [] and stop.received == "SIGTERM"
        stop.received_at -= preemption.REPEAT_WINDOW_S  # as if the first one came a while ago
        os.kill(os.getpid(), signal.SIGUSR1)  # SIGUSR1 only ever asks for a clean stop
        assert codes == []
        with pytest.raises(_Exited):
            os.kill(os.getpid(), signal.SIGTERM)
        assert codes == [128 + signal.SIGTERM]
        assert "received SIGTERM again: exiting now, without a checkpoint" in capfd.readouterr().err


def test_sigusr1_asks_too_and_the_previous_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    with Preemption() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run():
        with Preemption():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before]


# ------------------------------------------------------------------------------------------------- the trainer


def fit_with_sigusr1_during_step_three(recipe):
    """Train `recipe` in this process, sending SIGUSR1 while the loss of step 3 is computed; the summary."""
    from flowmatch.training.assembly import assemble
    from flowmatch.training.loop import Trainer

    run = assemble(recipe)
    trainer = Trainer(run)
    real = trainer.micro_loss

    def signal_during_step_three(batch, generator):
        if trainer.step == 2:  # the loss of step 3 is being computed
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(batch, generator)

    trainer.micro_loss = signal_during_step_three
    with run:
        return trainer.fit()


def test_the_step_in_flight_finishes_then_a_checkpoint_and_no_final_validation(tmp_path, digit_shards):
    from test_train import tiny_recipe


    summary = fit_with_sigusr1_during_step_three(
        tiny_recipe(tmp_path / "run", digit_shards, **{"train.max_steps": 6, "train.checkpoint_every": 100}))
    assert (summary.preempted, summary.final_step) == (True, 3)
    assert summary.last_checkpoint == tmp_path / "run" / "checkpoints" / "3"
    assert verify_checkpoint(summary.last_checkpoint) == []
    assert not list((tmp_path / "run").glob("samples/*.png"))  # the end-of-run validation was skipped


def test_a_stop_before_the_first_step_saves_nothing(tmp_path, digit_shards):
    from test_train import tiny_recipe

    from flowmatch.training.assembly import assemble
    from flowmatch.training.loop import Trainer

    run = assemble(tiny_recipe(tmp_path / "run", digit_shards))
    trainer = Trainer(run)
    trainer.preemption.received = "SIGTERM"  # as if it had arrived while the run was being assembled
    with run:
        summary = trainer.fit()
    assert (summary.preempted, summary.final_step, summary.last_checkpoint) == (True, 0, None)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------- a real run


def _command(run_dir: Path, shards: Path) -> list[str]:
    """The settings of tests/test_train_distributed.py's zero2 run (6 steps, checkpoints every 3)."""
    return [sys.executable, *_train_args(run_dir, shards, "distributed.zero_stage=2")]


def _start(run_dir: Path, shards: Path) -> list[subprocess.Popen]:
    """Two ranks of one job, each its own process, output to RUN_DIR.rank<r>.log."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        with open(f"{run_dir}.rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen(_command(run_dir, shards), cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout_s: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _logged_steps(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row for row in rows if "loss" in row}


def _log(run_dir: Path, rank: int) -> str:
    return Path(f"{run_dir}.rank{rank}.log").read_text()


@pytest.mark.slow
def test_sigterm_to_one_rank_of_a_zero2_run_stops_both_and_the_rerun_is_bit_identical(tmp_path, digit_shards,
                                                                                        train_runs):
    run = tmp_path / "run"
    procs = _start(run, digit_shards)
    deadline = time.monotonic() + 240
    while SIGNAL_AT_STEP not in _logged_steps(run):
        assert all(p.poll() is None for p in procs), _log(run, 0) + _log(run, 1)
        assert time.monotonic() < deadline, "the run did not reach the step to signal at"
        time.sleep(0.05)
    signalled = time.monotonic()
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the other must learn of it from the step's agreement
    codes = _finish(procs)
    seconds = time.monotonic() - signalled
    print(f"\nSIGTERM to exit of both ranks: {seconds:.1f} s")
    assert codes == [0, 0], _log(run, 0) + _log(run, 1)
    assert seconds < EXIT_WITHIN_S
    ckpts = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
    stopped = ckpts[-1]
    # The stop's checkpoint, beside the periodic one if the run got that far.
    assert ckpts == sorted({stopped} | ({CHECKPOINT_EVERY} if stopped >= CHECKPOINT_EVERY else set())), ckpts
    assert SIGNAL_AT_STEP <= stopped < STEPS and sorted(_logged_steps(run)) == list(range(1, stopped + 1))
    ckpt = run / "checkpoints" / str(stopped)
    assert verify_checkpoint(ckpt) == [] and read_meta(ckpt).step == stopped
    assert {p.name for p in (ckpt / "state").iterdir()} >= {"rank00000.safetensors", "rank00001.safetensors"}
    assert "[flowmatch rank 1] received SIGTERM" in _log(run, 1)
    assert f"stopped by a stop signal (on another rank) at step {stopped}: checkpoint {ckpt}" in _log(run, 0)
    # One summary line per job, from rank 0.
    assert "run the same command to resume" in _log(run, 0) and "run the same command" not in _log(run, 1)

    resumed_codes = _finish(_start(run, digit_shards))
    assert resumed_codes == [0, 0], _log(run, 0) + _log(run, 1)
    assert f"resuming from {ckpt} (step {stopped})" in _log(run, 0)
    ref = train_runs.zero2  # uninterrupted, launched once for the session

    got, want = _logged_steps(run), _logged_steps(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [(got[s]["loss"], got[s]["lr"]) for s in got] == [(want[s]["loss"], want[s]["lr"]) for s in got]
    for name in ("model.safetensors", "ema.safetensors", "state/rank00000.safetensors", "state/rank00001.safetensors"):
        a, b = (load_file(d / "checkpoints" / str(STEPS) / name) for d in (run, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
