"""Fine-tuning from `model.init_from` on several CPU processes (gloo) follows one process: full training under
ZeRO-3 (two one-process "nodes"), DoRA (a LoRA with magnitudes) under ZeRO-3, where the frozen base weights are
partitioned like the adapters but only the adapters have optimizer state, and a LoRA on an nf4 base under ZeRO-2
(2 processes started without a launcher: tests/launching.py::rank_envs), where every rank loads the base from
`init_from` before it quantises it.

The base is the tiny digits model trained in this process for 2 steps; every run then trains 6 steps from it on
the same global batches (see tests/test_train_distributed.py, whose settings and tolerances these reuse). Each
2-process job costs ~15 s of CPU, nearly all start-up: one job per property (init_from under ZeRO-2 is the nf4
job's, plain LoRA under ZeRO-3 is the DoRA job's, whose adapters are a LoRA's plus magnitudes).
"""

from __future__ import annotations

import json
import sys
from functools import cached_property
from pathlib import Path

import pytest
from launching import assert_succeeded, free_port, launch_jobs, rank_envs, torchrun
from safetensors.torch import load_file

from flowmatch.checkpoint import read_layout, read_meta
from flowmatch.cli import main as cli_main
from flowmatch.models.lora import is_adapter
from flowmatch.training import train
from tests.test_train import tiny_recipe
from tests.test_train_distributed import STEPS, _assert_same_trajectory, _train_args

pytestmark = pytest.mark.slow

LORA = 'model.lora={"rank": 4, "alpha": 8}'
LORA_ARGS = ("optim.lr=0.02", LORA)
DORA_ARGS = ("optim.lr=0.02", 'model.lora={"rank": 4, "alpha": 8, "kind": "dora"}')
QLORA_ARGS = (*LORA_ARGS, "model.quantize=nf4")
# The one-process references (trained in this process) by name: their overrides.
ONE_PROCESS = {"one": (), "dora-one": DORA_ARGS, "qlora-one": QLORA_ARGS}


class Runs:
    """The base run and the one-process references (trained here), and the distributed runs started from the
    base, each launched on first use."""

    def __init__(self, root: Path, shards: Path) -> None:
        self.root, self.shards = root, shards

    def _args(self, run: str, *extra: str) -> list[str]:
        return _train_args(self.root / run, self.shards, f"model.init_from={self.base}", *extra)

    @cached_property
    def base(self) -> Path:
        run = self.root / "base"
        train(tiny_recipe(run, self.shards, **{"train.max_steps": 2}))
        return run

    def _here(self, name: str, *extra: str) -> Path:
        """A one-process reference, trained in this process (a launch would add seconds of start-up): 2 loader
        workers feed its 2 micro-batches of 8, as the 2 ranks' streams feed theirs."""
        if not (self.root / name / "checkpoints" / str(STEPS)).is_dir():
            args = self._args(name, "data.num_workers=2", "train.micro_batch_size=8", *extra)
            assert cli_main(args[args.index("train"):]) == 0, name
        return self.root / name

    def _zero3(self, name: str, *extra: str) -> tuple[list[list[str]], list[Path]]:
        """Two one-process "nodes" meeting at a c10d rendezvous on localhost."""
        command = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                           f"127.0.0.1:{free_port()}", *self._args(name, "distributed.zero_stage=3", *extra))
        return [command, command], [self.root / f"{name}-node{i}.log" for i in range(2)]

    @cached_property
    def _launched(self) -> dict[str, tuple[list[int], list[Path]]]:
        """The three 2-process jobs, started side by side at the first use of any (they need nothing from each
        other, and each launch's start-up and rendezvous leave a core idle)."""
        qlora = [sys.executable, *self._args("qlora-zero2", "distributed.zero_stage=2", *QLORA_ARGS)]
        qlora_logs = [self.root / f"qlora-zero2-rank{r}.log" for r in range(2)]
        return launch_jobs({"zero3": self._zero3("zero3"), "dora-zero3": self._zero3("dora-zero3", *DORA_ARGS),
                            "qlora-zero2": ([qlora, qlora], qlora_logs)}, envs={"qlora-zero2": rank_envs(2)})

    def run(self, name: str) -> Path:
        if name in ONE_PROCESS:
            return self._here(name, *ONE_PROCESS[name])
        assert_succeeded(self._launched[name])
        return self.root / name

    @property
    def full_one(self) -> Path:
        return self.run("one")

    @property
    def full_zero3(self) -> Path:
        return self.run("zero3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digit_shards) -> Runs:
    return Runs(tmp_path_factory.mktemp("finetune-runs"), digit_shards)


def test_full_finetune_zero3_on_two_nodes_follows_one_process(runs):
    layout = read_layout(runs.full_zero3)
    assert (layout.world_size, layout.zero_stage) == (2, 3)
    _assert_same_trajectory(runs.full_zero3, runs.full_one)


def test_dora_zero3_on_two_nodes_follows_one_process(runs):
    """DoRA's magnitudes start at the base rows' norms, which under ZeRO-3 are partitioned when peft injects:
    the trainer gathers them (a run that reads its own slice starts from wrong norms, or NaN, and leaves the
    one-process trajectory). The adapters are a LoRA's plus magnitudes: this run pins LoRA under ZeRO-3 too."""
    zero3, one = runs.run("dora-zero3"), runs.run("dora-one")
    ckpt = zero3 / "checkpoints" / str(STEPS)
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(is_adapter(k) for k in saved)
    assert any(".lora_magnitude_vector." in k for k in saved)
    # Each rank's AdamW holds a slice of the adapters only: its flat partition is about half their size.
    n = sum(t.numel() for t in saved.values())
    for rank in range(2):
        state = load_file(ckpt / "state" / f"rank{rank:05d}.safetensors")
        moments = [t for k, t in state.items() if k.startswith("optim.state.") and k.endswith("exp_avg")]
        assert moments and sum(t.numel() for t in moments) <= n // 2 + 2, rank
    info = json.loads((ckpt / "state" / "rank00000.json").read_text())
    assert info["client_state"]["step"] == STEPS
    # peft starts every lora_B at zero: nonzero ones after 6 steps show the adapters trained (the loss of so few
    # low-rank steps falls too little to show it reliably; adapters behind a still-zero adaLN gate get no gradient).
    assert any(t.abs().max() > 0 for k, t in saved.items() if ".lora_B." in k)
    _assert_same_trajectory(zero3, one, loss_falls=False)


def test_lora_on_an_nf4_base_under_zero2_on_two_processes_follows_one_process(runs):
    # Fails if a rank loads or quantises another base (the ranks' forwards disagree), if ZeRO-2 partitions or
    # saves the frozen codes, or if the quantised base stops the adapters from training.
    zero2, one = runs.run("qlora-zero2"), runs.run("qlora-one")
    assert (read_layout(zero2).world_size, read_layout(zero2).zero_stage) == (2, 2)
    assert read_meta(one).init_from and read_meta(zero2).init_from == read_meta(one).init_from
    saved = load_file(zero2 / "checkpoints" / str(STEPS) / "model.safetensors")
    assert saved and all(is_adapter(k) for k in saved)
    assert any(t.abs().max() > 0 for k, t in saved.items() if ".lora_B." in k)
    _assert_same_trajectory(zero2, one, loss_falls=False)
