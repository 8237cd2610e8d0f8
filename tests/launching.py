"""Launching real training processes from tests: torchrun command lines, a clean environment, prompt teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh launch: no inherited rank variables, one thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def rank_envs(processes: int, **extra: str) -> list[dict[str, str]]:
    """The environments of the ``processes`` ranks of one job started without a launcher (torchrun's own
    interpreter costs seconds of start-up where the launcher is not what a test checks): each its RANK and
    LOCAL_RANK, the job's WORLD_SIZE and a free rendezvous port on localhost."""
    port = str(free_port())
    return [clean_env(RANK=str(r), WORLD_SIZE=str(processes), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, **extra) for r in range(processes)]


def launch(commands: list[list[str]], logs: list[Path], *, envs: list[dict[str, str]] | None = None,
           cwds: list[Path] | None = None, timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[list[int], float]:
    """Start the commands together (output to files, so no pipe can fill and block a rank); return codes, time."""
    codes, exits = launch_timed(commands, logs, envs=envs, cwds=cwds, timeout_s=timeout_s)
    return codes, max(exits)


def launch_timed(commands: list[list[str]], logs: list[Path], *, envs: list[dict[str, str]] | None = None,
                 cwds: list[Path] | None = None,
                 timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[list[int], list[float]]:
    """As :func:`launch`, with each process's exit time (seconds after the start): a test of how promptly the
    others follow a failing process compares exits, which start-up on a busy machine does not delay."""
    envs = envs or [clean_env() for _ in commands]
    cwds = cwds or [ROOT] * len(commands)
    start = time.monotonic()
    procs = []
    for cmd, log, env, cwd in zip(commands, logs, envs, cwds):
        with open(log, "w") as out:
            # A session of its own, so that a hung launch is killed together with the workers it started.
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    exits: list[float | None] = [None] * len(procs)
    try:
        while None in exits:
            now = time.monotonic() - start
            for i, p in enumerate(procs):
                if exits[i] is None and p.poll() is not None:
                    exits[i] = now
            if now > timeout_s:
                raise subprocess.TimeoutExpired(commands[exits.index(None)], timeout_s)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [p.returncode for p in procs], exits


def torchrun(*args: str) -> list[str]:
    """`python -m torch.distributed.run ARGS` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def deepspeed(*args: str) -> list[str]:
    """The `deepspeed` launcher of this interpreter's environment."""
    return [str(Path(sys.executable).with_name("deepspeed")), *args]


def launch_jobs(jobs: dict[str, tuple[list[list[str]], list[Path]]], *,
                envs: dict[str, list[dict[str, str]]] | None = None,
                timeout_s: float = LAUNCH_TIMEOUT_S) -> dict[str, tuple[list[int], list[Path]]]:
    """Start independent jobs (each: its commands and their logs) all together; each job's return codes and logs.

    A launch spends seconds in start-up and rendezvous with a core idle: side by side, one job's start-up fills
    the other's waits on the 2-core machine."""
    envs = envs or {}
    commands, logs, all_envs, spans = [], [], [], {}
    for name, (cmds, job_logs) in jobs.items():
        spans[name] = slice(len(commands), len(commands) + len(cmds))
        commands += cmds
        logs += job_logs
        all_envs += envs.get(name) or [clean_env() for _ in cmds]
    codes, _ = launch(commands, logs, envs=all_envs, timeout_s=timeout_s)
    return {name: (codes[span], jobs[name][1]) for name, span in spans.items()}


def assert_succeeded(job: tuple[list[int], list[Path]]) -> None:
    """Every process of a job of :func:`launch_jobs` exited 0; otherwise fail with its logs."""
    codes, logs = job
    assert codes == [0] * len(codes), "".join(log.read_text() for log in logs)
