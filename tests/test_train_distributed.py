"""The real training command on several CPU processes (gloo): ``torchrun ... -m flowmatch train recipes/digits.yaml``.

Every run trains the tiny preset for 6 steps at a global batch of 16 on the same digit shards, checkpointing at
steps 3 and 6:

- ``one``: ``flowmatch train`` in the test's process (cli main: a launch would add ~6 s of start-up), ZeRO-0, 2
  loader workers, 2 micro-batches of 8 per step;
- ``zero2``: the ``deepspeed`` launcher on one node (2 processes), ZeRO-2, one micro-batch of 8 per rank (also
  tests/test_launchers.py's run of that launcher);
- ``zero3``: two ``torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d`` launchers on localhost (two
  "nodes" of one process), ZeRO-3.

The loader cuts the data into world_size x workers streams (2 in every run) and a micro-batch slot of the global
batch always reads the same stream, so all three runs train on the same samples in the same global batches. The
trainer draws noise, timesteps and caption dropout from one generator per micro-batch slot (rank x accumulation
steps + micro-batch index), so the random draws match too. What remains are fp32 sums taken in another order and
caption embeddings cached from other batches (ulp-level). Tolerances (measured on 2 cores):
per-step losses agree to rtol 1e-5 (measured: bitwise equal), gradient norms to rtol 1e-5 (measured: <= 1.1e-7),
final weights, EMA and post-hoc EMA snapshots to atol 1e-5 (measured: <= 3.9e-7, next to about 1e-3 that AdamW moves a
weight per step).

Also: one rank failing mid-run ends both "nodes" promptly with a non-zero status, and a ZeRO-2 checkpoint of 2
processes resumes on 1 process. Launches cost ~6 s (1 process) to ~18 s (2 processes) each on 2 cores, nearly
all of it start-up: ``zero2`` and ``zero3`` need nothing from each other and start side by side; ``one`` trains in
the test's process.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import cached_property
from pathlib import Path

import pytest
import torch
from launching import assert_succeeded, deepspeed, free_port, launch_jobs, launch_timed, torchrun
from safetensors.torch import load_file
from test_export import assert_same_as_checkpoint

from flowmatch.checkpoint import read_layout, read_meta
from flowmatch.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits.yaml"
STEPS = 6
CHECKPOINT_EVERY = 3
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
# How long after the failing node exits the other may take (measured between the exits: start-up, ~15 s for two
# processes on a quiet 2-core machine, varies by tens of seconds on a busy one); a rank waiting for its dead peer
# until distributed.timeout_s (set to 120 s below) would take far longer.
PROMPT_EXIT_S = 60

pytestmark = pytest.mark.slow


def _train_args(run_dir: Path | str, shards: Path, *overrides: str) -> list[str]:
    """``-m flowmatch train`` with the tiny settings every run shares, then ``overrides``."""
    return ["-m", "flowmatch", "train", str(RECIPE), f"run_dir={run_dir}", f"data.shards={shards}",
            "model.preset=tiny", f"train.max_steps={STEPS}", "train.batch_size=16", "train.log_every=1",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "optim.warmup_steps=0", "data.num_workers=0",
            "logging.tensorboard=false", "logging.progress=false", "sampling.per_prompt=1", "sampling.steps=2",
            "sampling.prompts=[a handwritten 3, a handwritten 7]", "train.ema_profiles=[0.05, 0.1]", *overrides]




def _steps(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl rows of the training steps (validation rows hold no ``loss``), by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def _weights(run_dir: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / str(step) / f"{name}.safetensors")


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class Runs:
    """The runs the tests share. The first use of any of them starts the launched two side by side (they need nothing
    from each other; one after the other, each launch's start-up and rendezvous leave a core idle)."""

    def __init__(self, root: Path, shards: Path) -> None:
        self.root, self.shards = root, shards

    def _jobs(self) -> dict[str, tuple[list[list[str]], list[Path]]]:
        """Each launched run's commands and logs (``one``, 1 process, ZeRO-0, where 2 loader workers (streams 0 and 1)
        feed the 2 micro-batches of each step, trains in this process).

        - zero2: the deepspeed launcher on one node, 2 processes (tests/test_launchers.py's run of that launcher:
          a launch of two ranks costs ~15 s of CPU);
        - zero3: two launchers meeting at a c10d rendezvous on localhost, one process each (node_rank only
          matters to the static rendezvous: c10d ranks the nodes as they join).
        """
        endpoint = f"127.0.0.1:{free_port()}"
        zero3 = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                         endpoint, *_train_args(self.root / "zero3", self.shards, "distributed.zero_stage=3"))
        return {
            "zero2": ([deepspeed("--num_gpus", "2", "--master_port", str(free_port()), "--module",
                                 *_train_args(self.root / "zero2", self.shards, "distributed.zero_stage=2")[1:])],
                      [self.root / "zero2.log"]),
            "zero3": ([zero3, zero3], [self.root / f"zero3-node{i}.log" for i in range(2)]),
        }

    @cached_property
    def _launched(self) -> dict[str, tuple[list[int], list[Path]]]:
        return launch_jobs(self._jobs())

    def _run(self, name: str) -> Path:
        assert_succeeded(self._launched[name])
        return self.root / name

    @cached_property
    def one(self) -> Path:
        """Trained in this process, after the launched runs (which need nothing from it)."""
        self._launched  # noqa: B018 - the launched runs first, so that their failure reads as theirs
        args = _train_args(self.root / "one", self.shards, "data.num_workers=2", "train.micro_batch_size=8")
        assert cli_main(args[2:]) == 0
        return self.root / "one"

    @property
    def zero2(self) -> Path:
        return self._run("zero2")

    @property
    def zero3(self) -> Path:
        return self._run("zero3")


@pytest.fixture
def runs(train_runs) -> Runs:
    """The session's runs (tests/conftest.py): tests/test_launchers.py compares with the same one-process run."""
    return train_runs


def _assert_same_trajectory(run: Path, ref: Path, *, loss_falls: bool = True) -> None:
    got, want = _steps(run), _steps(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=LOSS_RTOL), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=GRAD_NORM_RTOL), step
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12), step
    # The model really trained: otherwise equal trajectories would prove little (a caller that proves it another
    # way may pass loss_falls=False).
    if loss_falls:
        assert want[STEPS]["loss"] < 0.95 * want[1]["loss"]
    for name in ("model", "ema"):
        assert _max_abs_diff(_weights(run, STEPS, name), _weights(ref, STEPS, name)) < WEIGHT_ATOL, name
    # The EMA warmed up on every rank alike (6 updates with warm-up 0.1: mostly the latest weights, far from the
    # initial ones), and so did the post-hoc profiles, gathered from the ranks' partitions into the snapshots.
    assert read_layout(run / "checkpoints" / str(STEPS)).ema_updates == STEPS
    snapshot = f"ema/snapshots/{STEPS}.safetensors"
    assert _max_abs_diff(load_file(run / snapshot), load_file(ref / snapshot)) < WEIGHT_ATOL


def test_zero2_on_two_processes_follows_one_process(runs):
    _assert_same_trajectory(runs.zero2, runs.one)


def test_zero3_on_two_nodes_follows_one_process(runs):
    layout = read_layout(runs.zero3 / "checkpoints" / str(STEPS))
    assert (layout.world_size, layout.zero_stage, layout.precision) == (2, 3, "fp32")
    _assert_same_trajectory(runs.zero3, runs.one)


def test_zero3_run_of_two_processes_exports_from_its_consolidated_checkpoint(runs, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["export", str(runs.zero3), str(out)]) == 0
    assert_same_as_checkpoint(out / "transformer", runs.zero3, ema=True)


def test_one_rank_failing_ends_every_rank_promptly(tmp_path, digit_shards):
    # Two "nodes" in different working directories and a relative run_dir: on node 1 the run directory is a
    # file, so rank 1 (the static rendezvous keeps node ranks) fails when it writes its part of the step-3
    # checkpoint while rank 0 waits for it inside DeepSpeed's checkpoint collectives.
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    (cwds[1] / "run").write_text("not a directory\n")
    port = str(free_port())
    commands = [torchrun("--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr",
                          "127.0.0.1", "--master_port", port,
                          *_train_args("run", digit_shards, "distributed.zero_stage=2", "distributed.timeout_s=120"))
                for i in range(2)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    codes, exits = launch_timed(commands, logs, cwds=cwds)
    out0, out1 = (log.read_text() for log in logs)
    assert codes[0] != 0 and codes[1] != 0, (codes, out0, out1)
    assert exits[0] - exits[1] < PROMPT_EXIT_S, exits
    assert "[flowmatch rank 1] failed: NotADirectoryError" in out1 and "Traceback" in out1
    assert "[flowmatch rank 0] stopping because rank 1 failed: NotADirectoryError" in out0
    assert sorted(_steps(cwds[0] / "run")) == [1, 2, 3]  # it failed mid-run, after 3 steps
    assert not (cwds[0] / "run" / "checkpoints" / "3").exists()  # and left no half-written checkpoint behind


def test_zero2_two_process_checkpoint_resumes_on_one_process(runs, capsys, caplog):
    src, run = runs.zero2, runs.root / "regrouped"
    shutil.copytree(src / "checkpoints" / str(CHECKPOINT_EVERY), run / "checkpoints" / str(CHECKPOINT_EVERY))
    snapshot = f"ema/snapshots/{CHECKPOINT_EVERY}.safetensors"
    (run / snapshot).parent.mkdir(parents=True)
    shutil.copy(src / snapshot, run / snapshot)
    # The one-process resume trains in this process (a launch would add seconds of start-up): what it printed
    # and logged.
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert cli_main(_train_args(run, runs.shards)[2:]) == 0
    printed = capsys.readouterr()
    out = printed.out + printed.err + caplog.text
    assert f"resuming from {run / 'checkpoints' / str(CHECKPOINT_EVERY)} (step {CHECKPOINT_EVERY})" in out
    assert "AdamW moments were re-sharded from their whole tensors" in out and "restart from zero" not in out
    ckpt = run / "checkpoints" / str(STEPS)
    layout = read_layout(ckpt)
    assert (read_meta(ckpt).step, layout.world_size, layout.zero_stage) == (STEPS, 1, 0)
    got, want = _steps(run), _steps(src)
    assert sorted(got) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    for step in got:  # the schedule went on from where the 2-process run left it
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9), step
    # The EMA came back with its warm-up position (restarted, the count would read 3) and the post-hoc profiles
    # from their snapshot. Its values are checked on this path by tests/test_ema.py, on one process.
    assert layout.ema_updates == STEPS
    assert f"EMA profiles restored from {run / snapshot}" in out
