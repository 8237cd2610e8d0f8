"""Fine-tuning from `model.init_from` on several CPU processes (gloo) follows one process: full training under
ZeRO-2 (``torchrun --standalone``, 2 processes) and ZeRO-3 (two one-process "nodes"), and LoRA under ZeRO-3, where
the frozen base weights are partitioned like the adapters but only the adapters have optimizer state.

The base is the tiny digits model trained in this process for 2 steps; every run then trains 6 steps from it on
the same global batches (see tests/test_train_distributed.py, whose settings and tolerances these reuse).
"""

from __future__ import annotations

import json
import sys
from functools import cached_property
from pathlib import Path

import pytest
from launching import free_port, launch, torchrun
from safetensors.torch import load_file

from flowmatch.checkpoint import read_layout, read_meta
from flowmatch.models.lora import is_adapter
from flowmatch.training import train
from tests.test_train import tiny_recipe
from tests.test_train_distributed import STEPS, _assert_same_trajectory, _train_args

pytestmark = pytest.mark.slow

LORA = 'model.lora={"rank": 4, "alpha": 8}'


class Runs:
    """The base run and the runs started from it, each made on first use."""

    def __init__(self, root: Path, shards: Path) -> None:
        self.root, self.shards = root, shards

    def _args(self, run: Path, *extra: str) -> list[str]:
        return _train_args(run, self.shards, f"model.init_from={self.base}", *extra)

    def _check(self, codes: list[int], *logs: str) -> None:
        assert all(c == 0 for c in codes), "".join((self.root / log).read_text() for log in logs)

    @cached_property
    def base(self) -> Path:
        run = self.root / "base"
        train(tiny_recipe(run, self.shards, **{"train.max_steps": 2}))
        return run

    def one(self, *extra: str, name: str = "one") -> Path:
        run = self.root / name
        codes, _ = launch([[sys.executable, *self._args(run, "data.num_workers=2", "train.micro_batch_size=8",
                                                        *extra)]], [self.root / f"{name}.log"])
        self._check(codes, f"{name}.log")
        return run

    def zero3(self, *extra: str, name: str = "zero3") -> Path:
        run, endpoint = self.root / name, f"127.0.0.1:{free_port()}"
        command = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                           endpoint, *self._args(run, "distributed.zero_stage=3", *extra))
        codes, _ = launch([command, command], [self.root / f"{name}-node{i}.log" for i in range(2)])
        self._check(codes, f"{name}-node0.log", f"{name}-node1.log")
        return run

    @cached_property
    def full_one(self) -> Path:
        return self.one()

    @cached_property
    def full_zero2(self) -> Path:
        run = self.root / "zero2"
        codes, _ = launch([torchrun("--standalone", "--nproc_per_node", "2",
                                    *self._args(run, "distributed.zero_stage=2"))], [self.root / "zero2.log"])
        self._check(codes, "zero2.log")
        return run

    @cached_property
    def full_zero3(self) -> Path:
        return self.zero3()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digit_shards) -> Runs:
    return Runs(tmp_path_factory.mktemp("finetune-runs"), digit_shards)


def test_full_finetune_zero2_on_two_processes_follows_one_process(runs):
    _assert_same_trajectory(runs.full_zero2, runs.full_one)
    assert read_meta(runs.full_zero2).init_from == read_meta(runs.full_one).init_from


def test_full_finetune_zero3_on_two_nodes_follows_one_process(runs):
    layout = read_layout(runs.full_zero3)
    assert (layout.world_size, layout.zero_stage) == (2, 3)
    _assert_same_trajectory(runs.full_zero3, runs.full_one)


def test_lora_zero3_on_two_nodes_follows_one_process(runs):
    lora = ("optim.lr=0.05", LORA)
    zero3, one = runs.zero3(*lora, name="lora-zero3"), runs.one(*lora, name="lora-one")
    ckpt = zero3 / "checkpoints" / str(STEPS)
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(is_adapter(k) for k in saved)
    # Each rank's AdamW holds a slice of the adapters only: its flat partition is about half their size.
    n = sum(t.numel() for t in saved.values())
    for rank in range(2):
        state = load_file(ckpt / "state" / f"rank{rank:05d}.safetensors")
        moments = [t for k, t in state.items() if k.startswith("optim.state.") and k.endswith("exp_avg")]
        assert sum(t.numel() for t in moments) <= n // 2 + 2, rank
    info = json.loads((ckpt / "state" / "rank00000.json").read_text())
    assert info["client_state"]["step"] == STEPS
    _assert_same_trajectory(zero3, one)
