"""A run directory from elsewhere runs no code, one writer per run, no orphaned data workers, one paragraph when
every shard fails (issue 31, items 1, 2 and 6)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from data_tools.serve import ShardServer
from flowmatch.checkpoint.manifest import describe_files, read_manifest, write_manifest
from flowmatch.config import RecipeError, load_recipe
from flowmatch.data import DataConfig, build_loader
from flowmatch.data.opener import RetryPolicy, open_shard
from flowmatch.data.trust import TRUST_ENV
from flowmatch.evaluate import evaluate
from flowmatch.runlock import LOCK_FILE, RunLock, RunLocked
from flowmatch.training import train
from tests.test_train import run_cli  # the CLI in this process: its exit status and output

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(retries=1, backoff_s=0.01, max_backoff_s=0.02, timeout_s=5.0)
TINY = {"model.preset": "tiny", "train.batch_size": 8, "train.log_every": 1, "optim.warmup_steps": 1,
        "logging.tensorboard": False, "logging.progress": False, "sampling.per_prompt": 1, "sampling.steps": 2,
        "sampling.prompts": ["a handwritten 3"], "eval.task": "generic"}

pytestmark = pytest.mark.hostile


def tiny_recipe(run_dir: Path, shards: Path, **extra):
    values = {"run_dir": str(run_dir), "data.shards": str(shards), "data.num_workers": 0, "train.max_steps": 2,
              "train.checkpoint_every": 2, **TINY, **extra}
    return load_recipe(ROOT / "recipes" / "digits.yaml", [f"{k}={json.dumps(v)}" for k, v in values.items()])


def tamper_recipe(ckpt: Path, **data) -> None:
    """What someone handing over a run can do: change its stored recipe and re-hash the manifest to match."""
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    recipe["data"].update(data)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    files = read_manifest(ckpt)
    files.update(describe_files(ckpt, [ckpt / "recipe.yaml"], rank=0))
    write_manifest(ckpt, json.loads((ckpt / "manifest.json").read_text())["step"], files)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digit_shards) -> Path:
    run = tmp_path_factory.mktemp("trust") / "run"
    train(tiny_recipe(run, digit_shards))
    return run


# ------------------------------------------------------------------------ 1. a run from elsewhere runs no command


def test_a_stored_recipe_runs_no_pipe_command(trained_run, tmp_path, monkeypatch):
    """Bug caught: recipe_from_yaml not marking the recipe as stored (or resolve_split not checking it): the
    command in the handed-over run's val_shards runs as soon as eval reads held-out data."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    pwned = tmp_path / "PWNED"
    tamper_recipe(trained_run / "checkpoints" / "2", val_shards=f"pipe:touch {pwned}")
    with pytest.raises(RecipeError) as err:
        try:
            evaluate(trained_run, likelihood_samples=2)
        finally:
            assert not pwned.exists(), "a run directory from elsewhere ran a command"
    message = str(err.value)
    assert "data.val_shards" in message and f"touch {pwned}" in message and "--trust-run-dir" in message
    assert "checkpoints/2/recipe.yaml" in message


def test_trust_run_dir_lets_the_stored_command_run(trained_run, digit_shards, monkeypatch):
    """Bug caught: the trust switch ignored (a run whose recipe reads shards through pipe: can never be evaluated)."""
    val = sorted(Path(digit_shards).glob("val-*.tar"))[0]
    tamper_recipe(trained_run / "checkpoints" / "2", val_shards=f"pipe:cat {val}")
    monkeypatch.setenv(TRUST_ENV, "1")
    report = evaluate(trained_run, likelihood_samples=2)
    assert report.bits_per_dim is not None and report.bits_per_dim > 0


def test_flowmatch_eval_refuses_a_stored_command_and_trust_run_dir_allows_it(trained_run, digit_shards, tmp_path,
                                                                              monkeypatch):
    """The command line: one paragraph naming the key, the command and the flag, exit 2; --trust-run-dir runs it."""
    pwned = tmp_path / "PWNED"
    tamper_recipe(trained_run / "checkpoints" / "2", val_shards=f"pipe:touch {pwned}")
    monkeypatch.setenv(TRUST_ENV, "")  # restored after the test: --trust-run-dir sets it in this process
    res = run_cli("eval", str(trained_run), "--likelihood-samples", "2")
    assert res.returncode == 2 and not pwned.exists(), res.stderr
    assert "Traceback" not in res.stderr and "data.val_shards" in res.stderr and "--trust-run-dir" in res.stderr
    val = sorted(Path(digit_shards).glob("val-*.tar"))[0]
    tamper_recipe(trained_run / "checkpoints" / "2", val_shards=f"pipe:cat {val}")
    res = run_cli("eval", str(trained_run), "--likelihood-samples", "2", "--trust-run-dir")
    assert res.returncode == 0 and "bits/dim" in res.stdout.lower().replace("bits per dim", "bits/dim"), res.stderr


def test_pipe_commands_run_without_a_shell(tmp_path, digit_shards):
    """Bug caught: Popen(command, shell=True): `;` chains a second command (here the touch)."""
    pwned = tmp_path / "PWNED"
    shard = sorted(Path(digit_shards).glob("train-*.tar"))[0]
    with pytest.raises(ValueError, match="run without a shell"):
        open_shard(f"pipe:cat {shard}; touch {pwned}", policy=FAST)
    with pytest.raises(RecipeError, match=r"data.shards: .*uses the shell \(;\).*pipe:sh -c"):
        build_loader(DataConfig(shards=f"pipe:cat {shard}; touch {pwned}", prepare="", num_workers=0,
                                remote=FAST), rank=0, world_size=1, batch_size=2, seed=0)
    assert not pwned.exists()
    stream, _ = open_shard(f"pipe:cat {shard}", policy=FAST)  # one command still reads
    assert stream.read() == shard.read_bytes()


# ------------------------------------------------------------------------ 2. one writer per run directory


def start_trainer(run: Path, shards: str, workers: int, ready=None, **extra) -> subprocess.Popen:
    """`flowmatch train` in a subprocess, returned once `ready()` holds (default: it has logged a step)."""
    metrics = run / "metrics.jsonl"
    ready = ready or (lambda: metrics.is_file() and '"loss"' in metrics.read_text())
    args = {**TINY, "data.num_workers": workers, "train.max_steps": 100000, "train.checkpoint_every": 100000, **extra}
    log = run.parent / f"{run.name}.log"  # a file, not a pipe: orphaned workers would hold a pipe open
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flowmatch", "train", "recipes/digits.yaml", f"run_dir={run}",
                                 f"data.shards={shards}", *(f"{k}={json.dumps(v)}" for k, v in args.items())],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the trainer did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def hold_lock(run: Path) -> subprocess.Popen:
    """A process holding `run`'s lock as `flowmatch train` does (RunLock, its command's name), returned once it
    holds it: a trainer's lock without a trainer's start-up (~7 s of CPU for its imports and encoders)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from flowmatch.runlock import RunLock; "
                               "RunLock(sys.argv[1], 'flowmatch train').acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_trainer_on_a_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path, digit_shards, capsys):
    """Bugs caught: assemble not taking the lock (both train, one crashes on the other's save), the lock not
    naming its holder, a killed holder's record blocking the run for good."""
    run = tmp_path / "run"
    run.mkdir()
    first = hold_lock(run)
    try:
        with pytest.raises(RunLocked) as err:
            train(tiny_recipe(run, digit_shards))
        assert f"PID {first.pid} on host {socket.gethostname()}" in str(err.value)
        assert "flowmatch train" in str(err.value)
        assert not (run / "checkpoints").exists()  # the refused trainer wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / LOCK_FILE).is_file()  # SIGKILL runs no clean-up: the record stays behind
    with RunLock(run, "flowmatch train"):
        said = capsys.readouterr().out
        assert "taking over the lock" in said and f"PID {first.pid}" in said
    assert not (run / LOCK_FILE).exists()  # released: gone


def test_the_lock_is_released_after_a_run_and_guards_ema_and_export(trained_run, tmp_path):
    """Bugs caught: the trainer keeping the lock after it returns, `flowmatch ema` or `export` not taking it."""
    assert not (trained_run / LOCK_FILE).exists()
    holder = hold_lock(trained_run)
    try:
        res = run_cli("ema", str(trained_run), "--sigma-rel", "0.1")
        assert res.returncode == 1 and f"PID {holder.pid}" in res.stderr and "Traceback" not in res.stderr
        res = run_cli("export", str(trained_run), str(trained_run))
        assert res.returncode == 1 and f"PID {holder.pid}" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------ 6. no orphaned data workers


class StalledServer:
    """A TCP port that takes connections and never answers: a shard server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return
            self.connected.set()

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.slow
def test_sigkill_of_the_trainer_takes_its_data_workers_with_it(tmp_path, digit_shards):
    """Bug caught: the worker_init_fn not asking for a parent-death signal: a killed trainer's workers live on,
    reparented to PID 1, as long as they are busy (here one waits on a shard server that hangs; torch's own check
    of the parent runs only between batches). With the signal they go at once."""
    server = StalledServer()
    shards = f"{sorted(Path(digit_shards).glob('train-*.tar'))[0]}::http://127.0.0.1:{server.port}/stalled.tar"
    try:
        trainer = start_trainer(tmp_path / "run", shards, workers=2, ready=server.connected.is_set,
                                **{"data.remote.timeout_s": 120.0, "data.shuffle_buffer": 8})
        workers = [p for p in psutil.Process(trainer.pid).children(recursive=True)
                   if p.cmdline() == psutil.Process(trainer.pid).cmdline()]  # forked workers, not pipe commands
        assert len(workers) == 2, workers
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        _, alive = psutil.wait_procs(workers, timeout=3)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:
            p.kill()
        assert not alive, f"data workers outlived their trainer: {[(p.pid, p.ppid()) for p in alive]}"
    finally:
        server.close()


# ------------------------------------------------------------------------ every shard failing


def test_every_shard_failing_is_one_paragraph(tmp_path, caplog):
    """Bugs caught: the format detection saying "treating the shards as raw images" and carrying on, the workers'
    error arriving as a worker traceback, the message not naming how many shards failed, why, and the first."""
    with ShardServer(tmp_path) as server:  # an empty folder: every shard is a 404
        urls = server.url("train{0..3}-000000.tar")
        first = server.url("train0-000000.tar")
        cfg = DataConfig(shards=urls, prepare="", resolution=8, channels=1, num_workers=1, remote=FAST)
        with pytest.raises(RuntimeError) as err:
            build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0)
        assert "raw images" not in caplog.text
        assert "3 of 3 shards could not be read (3 x unreadable shard: HTTP 404 Not Found)" in str(err.value)
        assert first in str(err.value)
        loader = build_loader(dataclasses.replace(cfg, cached=False), rank=0, world_size=1, batch_size=2, seed=0)
        with pytest.raises(RuntimeError) as err:
            next(iter(loader))
    message = str(err.value)
    assert "Traceback" not in message and "worker process" not in message
    assert "4 of 4 shards could not be read (4 x unreadable shard: HTTP 404 Not Found)" in message
    assert first in message
