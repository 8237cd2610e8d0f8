"""Every documented launcher starts the real training command on CPU and follows the one-process trajectory.

The reference is the 1-process run of ``test_train_distributed`` (same shards, steps, global batch and seeds);
each launcher here runs 2 processes under ZeRO-2 and must give the same per-step losses, gradient norms and final
weights within that module's tolerances. Launch mistakes (a port in use, a rank that never arrives) end with a
message instead of a hang.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from launching import assert_succeeded, clean_env, deepspeed, free_port, launch_jobs
from test_train_distributed import _assert_same_trajectory, _train_args

from flowmatch.engine.launch import LaunchError, detect_launch, first_host

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reference(train_runs) -> Path:
    """The one-process run of tests/test_train_distributed.py, shared through the session (tests/conftest.py)."""
    return train_runs.one


def _slurm_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    """What `srun --ntasks 2` on one node sets for task `rank` (and nothing of torchrun's)."""
    return clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), **extra)


def _read(logs: list[Path]) -> str:
    return "\n".join(p.read_text() for p in logs)


# -- reading the launchers' variables -----------------------------------------------------------------------------


def test_launch_variables_of_each_launcher():
    torchrun = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="n0", MASTER_PORT="29500",
                    TORCHELASTIC_RUN_ID="x")
    assert detect_launch(torchrun).__dict__ == dict(rank=3, world_size=4, local_rank=1, master_addr="n0",
                                                    master_port=29500, launcher="torchrun")
    deepspeed = {k: v for k, v in torchrun.items() if k != "TORCHELASTIC_RUN_ID"}
    assert detect_launch(deepspeed).launcher == "env"
    slurm = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
                 SLURM_JOB_NODELIST="gpu[07-09,12],cpu1")
    info = detect_launch(slurm)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.launcher) == (
        5, 8, 1, "gpu07", 20000 + 3456, "slurm")
    assert detect_launch({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_addr == "head"
    assert detect_launch({}).launcher == "single" and detect_launch({}).world_size == 1
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT are not"):
        detect_launch(dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(LaunchError, match="rank 2 of a world of 2"):
        detect_launch(dict(SLURM_PROCID="2", SLURM_NTASKS="2", SLURM_JOB_ID="1"))
    assert [first_host(n) for n in ("a", "a,b", "node[001-004]", "x[3,5]-ib", "h[9]")] == [
        "a", "a", "node001", "x3-ib", "h9"]


# -- real launches ------------------------------------------------------------------------------------------------

pytest_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(tmp_path_factory, digit_shards) -> tuple[Path, dict[str, tuple[list[int], list[Path]]]]:
    """Each launcher's ZeRO-2 run of 2 processes: the root of the run directories, each run's exit codes and logs.
    The two need nothing from each other and start side by side (one after the other, each launch's start-up and
    rendezvous leave a core idle). The deepspeed launcher on one node is the session's ``zero2`` run."""
    root = tmp_path_factory.mktemp("launchers")

    def args(name: str) -> list[str]:
        return _train_args(root / name, digit_shards, "distributed.zero_stage=2")[1:]

    hostfile = root / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    ports = {name: free_port() for name in ("two-nodes", "slurm")}
    jobs = {
        # Two "nodes" started by hand on localhost, no ssh.
        "two-nodes": ([deepspeed("--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(r),
                                  "--master_addr", "127.0.0.1", "--master_port", str(ports["two-nodes"]), "--module",
                                  *args("two-nodes")) for r in range(2)],
                      [root / f"two-nodes-node{r}.log" for r in range(2)]),
        "slurm": ([[sys.executable, "-m", *args("slurm")]] * 2, [root / f"slurm-task{r}.log" for r in range(2)]),
    }
    return root, launch_jobs(jobs, envs={"slurm": [_slurm_env(r, ports["slurm"]) for r in range(2)]})


def _run(launched, name: str) -> Path:
    root, jobs = launched
    assert_succeeded(jobs[name])
    return root / name


@pytest_slow
def test_deepspeed_launcher_on_one_node(train_runs, reference):
    _assert_same_trajectory(train_runs.zero2, reference)


@pytest_slow
def test_deepspeed_launcher_on_two_nodes_without_ssh(launched, reference):
    _assert_same_trajectory(_run(launched, "two-nodes"), reference)


@pytest_slow
def test_slurm_tasks(launched, reference):
    _assert_same_trajectory(_run(launched, "slurm"), reference)
    assert _read(launched[1]["slurm"][1]).count("trained ") == 1  # one summary per job


@pytest_slow
def test_launch_mistakes_are_messages_not_hangs(tmp_path, digit_shards):
    def command(name: str) -> list[str]:
        return [sys.executable, *_train_args(tmp_path / name, digit_shards, "distributed.rendezvous_timeout_s=5")]

    # Two independent mistakes, launched side by side: the two tasks of a job whose port someone else listens
    # on, and a job whose second task never starts (rank 0 names it after distributed.rendezvous_timeout_s).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        jobs = {"busy": ([command("busy")] * 2, [tmp_path / f"busy{r}.log" for r in range(2)]),
                "alone": ([command("alone")], [tmp_path / "alone.log"])}
        start = time.monotonic()
        results = launch_jobs(jobs, envs={"busy": [_slurm_env(r, port) for r in range(2)],
                                          "alone": [_slurm_env(0, free_port())]}, timeout_s=120)
        seconds = time.monotonic() - start
    codes, logs = results["busy"]
    assert codes == [1, 1] and f"localhost:{port}" in logs[0].read_text() and "in use" in logs[0].read_text()
    # Rank 0 names the port as its own problem (torch's EADDRINUSE text alone also holds "in use").
    assert "rank 0 cannot host the rendezvous" in logs[0].read_text()
    assert "could not reach rank 0" in logs[1].read_text()
    assert "Traceback" not in logs[0].read_text()
    (code,), (log,) = results["alone"]
    text = log.read_text()
    assert code != 0 and "rank(s) 1 of 2 did not join" in text and "Traceback" not in text, text
    assert seconds < 60
