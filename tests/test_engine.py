"""The distributed engine: config checks, the LR schedule, the DeepSpeed config, one-process engines (fast), and
real runs (slow).

The fast engine tests build a real :class:`Engine` in this process (one rank, gloo, ZeRO 0-2): the EMA against
a hand-computed average, bf16 training with fp32 masters, and a discarded non-finite window whose count survives
a resume.

The slow tests launch tests/dist_scripts/train_tiny.py as real processes on CPU with gloo: one plain ``python``
process, ``torchrun --nproc_per_node 2``, two "nodes" (two ``torchrun --nnodes 2`` launchers on localhost),
and two bare processes given RANK/WORLD_SIZE by hand. Every configuration sees the same global batches, so:

- ZeRO-2 and ZeRO-3 on 2 processes follow the 1-process trajectory. fp32 sums in another order are the only
  difference: per-step losses agree to rtol 1e-5 (measured: <= 2e-7) and final weights and EMA to atol 1e-6
  (measured: <= 1.2e-7).
- A single process stopped by SIGKILL in the middle of a checkpoint and started again ends bit-identical to an
  uninterrupted run (weights, EMA, losses), also with a discarded non-finite window before the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest
import torch
from dist_scripts.train_tiny import RUN_MARK
from dist_scripts.train_tiny import main as train_tiny
from launching import (
    assert_succeeded,
    clean_env,
    free_port,
    launch,
    launch_jobs,
    launch_timed,
    rank_envs,
    torchrun,
)
from safetensors.torch import load_file
from torch import nn

from flowmatch.checkpoint import load_checkpoint, read_layout, save_checkpoint
from flowmatch.checkpoint.check import check_run, format_check
from flowmatch.dtypes import DTYPES, resolve_dtype
from flowmatch.engine import (
    PRECISIONS,
    DistributedConfig,
    Engine,
    OptimConfig,
    build_deepspeed_config,
    lr_factor,
    run_guarded,
)
from flowmatch.engine.ema import ShadowEma, check_decay
from flowmatch.engine.nonfinite import FiniteWindow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_tiny.py"
STEPS = 8  # train_tiny's default; checkpoints at 4 and 8
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


# ------------------------------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("field, value, words", [
    ("zero_stage", 4, "0, 1, 2, 3"),
    ("precision", "fp8", "fp32, bf16, fp16"),
    ("backend", "mpi", "auto, gloo, nccl"),
    ("timeout_s", 0, "positive"),
    ("zero3_persistence_threshold", -1, ">= 0"),
    ("offload_params", "yes", "true or false"),
])
def test_distributed_config_names_field_and_allowed_values(field, value, words):
    with pytest.raises(ValueError) as err:
        DistributedConfig(**{field: value})
    assert f"distributed.{field}" in str(err.value) and words in str(err.value) and repr(value) in str(err.value)


def test_offloading_needs_a_zero_stage_that_partitions():
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        DistributedConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage 1, 2 or 3"):
        DistributedConfig(offload_optimizer=True)
    DistributedConfig(zero_stage=3, offload_params=True, offload_optimizer=True)


def test_lr_factor_warmup_cosine_constant():
    cosine = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    constant = OptimConfig(warmup_steps=4, schedule="constant", min_lr_ratio=0.1)
    assert [lr_factor(s, cosine, max_steps=14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cosine, max_steps=14) == 1.0
    assert lr_factor(9, cosine, max_steps=14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: mean of 1 and 0.1
    assert lr_factor(14, cosine, max_steps=14) == pytest.approx(0.1)
    assert lr_factor(100, cosine, max_steps=14) == pytest.approx(0.1)  # past the end it stays at the floor
    assert lr_factor(9, constant, max_steps=14) == 1.0
    assert lr_factor(0, OptimConfig(warmup_steps=0, min_lr_ratio=0.0), max_steps=10) == 1.0


@pytest.mark.parametrize("field, value, words", [
    ("schedule", "linear", "one of cosine, constant"),
    ("min_lr_ratio", 1.5, "[0, 1]"),
    ("lr", 0.0, "lr must be > 0"),
])
def test_optim_config_checks_its_values(field, value, words):
    with pytest.raises(ValueError) as err:
        OptimConfig(**{field: value})
    assert words in str(err.value)


def test_one_dtype_table_for_precision_names():
    assert tuple(DTYPES) == PRECISIONS == ("fp32", "bf16", "fp16")
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16  # a device object needs no GPU
    with pytest.raises(ValueError, match="auto or one of fp32, bf16, fp16, got 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_deepspeed_config_batches_stages_and_precision():
    cfg = build_deepspeed_config(DistributedConfig(zero_stage=3, precision="bf16", offload_optimizer=True,
                                                   offload_params=True, zero3_persistence_threshold=7),
                                 micro_batch_size=4, grad_accum_steps=3, world_size=2, grad_clip=1.5, on_cuda=False)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 3)
    assert cfg["gradient_clipping"] == 1.5
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 7
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    plain = build_deepspeed_config(DistributedConfig(), micro_batch_size=1, grad_accum_steps=1, world_size=1,
                                   grad_clip=0.0, on_cuda=False)
    assert plain["zero_optimization"] == {"stage": 0} and plain["gradient_clipping"] == 0.0
    assert not plain["bf16"]["enabled"] and not plain["fp16"]["enabled"]
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_deepspeed_config(DistributedConfig(), micro_batch_size=0, grad_accum_steps=1, world_size=1,
                               grad_clip=0.0, on_cuda=False)


def test_shadow_ema_follows_the_formula_in_fp32():
    w = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.zeros(2, 2)]
    ema = ShadowEma(w, decay=0.9)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    w[0].fill_(3.0)
    w[1].fill_(1.0)
    ema.update(w)
    assert torch.allclose(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 3]))
    assert torch.allclose(ema.shadow[1], torch.full((2, 2), 0.1))
    ema.update(w, decay=0.0)  # decay 0 copies
    assert torch.equal(ema.shadow[1], torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_decay(1.5)
    with pytest.raises(ValueError, match="shape"):
        ema.load([torch.zeros(3), torch.zeros(2, 2)])


class _OneRank:
    """The process-group facts FiniteWindow uses, for one rank."""

    device = torch.device("cpu")

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()


def test_finite_window_records_on_the_device_and_agrees_once_per_window(monkeypatch):
    window = FiniteWindow(_OneRank())
    w = torch.ones(3, requires_grad=True)

    def host_sync(*args, **kwargs):
        raise AssertionError("backward must not read a value back to the host")

    with monkeypatch.context() as m:  # recording may not read the loss back (bool(), .item())
        m.setattr(torch.Tensor, "item", host_sync)
        m.setattr(torch.Tensor, "__bool__", host_sync)
        good = window.record((2 * w).sum())
        bad = window.record((w * float("inf")).sum())
    good.backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))  # a finite loss goes through unchanged
    w.grad = None
    bad.backward()
    assert w.grad.isnan().all()  # every gradient of a bad window is NaN, none usable
    assert window.agree() is False
    window.record((2 * w).sum())
    assert window.agree() is True  # the verdict starts over with each window
    with pytest.raises(RuntimeError, match="no loss was recorded"):
        window.agree()


# A small model and settings under which a few steps move every weight visibly.
_OPTIM = OptimConfig(lr=0.05, warmup_steps=0, schedule="constant", grad_clip=0.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4) -> (B, 2)
        return self.out(torch.tanh(self.inp(x)))


@contextlib.contextmanager
def _engine(**distributed):
    """A one-process Engine in this process with _Net set up (ZeRO 0-2)."""
    torch.manual_seed(0)
    engine = Engine(DistributedConfig(**distributed))
    try:
        model = _Net()
        engine.setup(model, model.parameters(), _OPTIM, max_steps=10, micro_batch_size=4, grad_accum_steps=1)
        yield engine
    finally:
        engine.shutdown()


def test_a_zero3_engine_gives_torch_its_own_linear_back_when_it_shuts_down():
    """zero.Init replaces torch.nn.functional.linear for the whole process (DeepSpeed's memory-efficient linear, with
    no forward-mode rule, so a JVP after it fails); the engine puts torch's back at shutdown. Bug caught: shutdown
    not releasing the ZeRO-3 layout (the planner's JVP tests then failed when they followed a ZeRO-3 run in one
    process)."""
    linear = torch.nn.functional.linear
    engine = Engine(DistributedConfig(zero_stage=3))
    try:
        with engine.model_init():
            torch.nn.Linear(4, 4)
        assert torch.nn.functional.linear is not linear  # what zero.Init does: the reason for the release
    finally:
        engine.shutdown()
    assert torch.nn.functional.linear is linear


def _train_step(engine: Engine, loss_scale: float = 1.0):
    x = torch.randn(4, 4)
    engine.backward(engine.forward(x.to(engine.dtype)).float().pow(2).mean() * loss_scale)
    return engine.step()


def test_ema_is_the_decayed_average_of_the_weights_after_each_step():
    # Fails if ema.update() does nothing, averages other weights (e.g. from before the step) or uses another decay.
    decay = 0.8
    with _engine() as engine:
        engine.init_ema(decay)
        initial = engine.model_state_dict()
        expected = dict(initial)
        for _ in range(3):
            assert _train_step(engine).stepped
            engine.ema.update()
            weights = engine.model_state_dict()
            expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
        ema = engine.ema.state_dict()
    assert ema.keys() == initial.keys()
    assert all((ema[k] - initial[k]).abs().max() > 1e-3 for k in ema)  # every tensor moved
    for k in ema:
        torch.testing.assert_close(ema[k], expected[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_runs_the_forward_in_bf16_and_exports_fp32_masters(zero_stage):
    with _engine(precision="bf16", zero_stage=zero_stage) as engine:
        seen: list[tuple[torch.dtype, torch.dtype]] = []
        engine.module.out.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
        assert engine.working_dtype == engine.dtype == torch.bfloat16
        for _ in range(2):
            assert _train_step(engine).stepped
        weights = engine.model_state_dict()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2  # activations in and out of a layer are bf16
    assert all(w.dtype == torch.float32 for w in weights.values())
    # Under ZeRO, real fp32 masters, not bf16 working copies widened: after two updates the values fall between bf16
    # values. Without ZeRO, DeepSpeed's bf16 wrapper keeps its masters to itself: the export is the working copy.
    widened = [torch.equal(w, w.bfloat16().float()) for w in weights.values()]
    assert widened == [zero_stage == 0] * len(weights)


def test_a_discarded_window_changes_nothing_and_its_count_survives_resume(tmp_path):
    with _engine() as engine:
        engine.init_ema(0.5)
        assert _train_step(engine).stepped
        before, ema_before, lr = engine.model_state_dict(), engine.ema.state_dict(), engine.lr
        result = _train_step(engine, loss_scale=float("inf"))
        assert (result.stepped, result.skipped, result.grad_norm) == (False, True, None)
        assert (engine.skipped_steps, engine.optimizer_steps, engine.lr) == (1, 1, lr)
        after = engine.model_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(torch.equal(ema_before[k], v) for k, v in engine.ema.state_dict().items())
        assert _train_step(engine).stepped  # and training goes on
        save_checkpoint(engine, tmp_path, 2, client_state={"step": 2}, recipe_yaml="", keep=1, ema=True)
    layout = read_layout(tmp_path)  # engine.json: the one record of the layout and the engine's counters
    assert (layout.world_size, layout.zero_stage, layout.precision) == (1, 0, "fp32")
    assert (layout.optimizer_steps, layout.skipped_steps, layout.ema_decay) == (2, 1, 0.5)
    with _engine() as engine:
        engine.init_ema(0.5)
        assert load_checkpoint(engine, tmp_path) == {"step": 2}
        assert (engine.skipped_steps, engine.optimizer_steps) == (1, 2)


def test_run_guarded_returns_the_result_and_exits_1_with_the_traceback():
    assert run_guarded(lambda a, b=0: a + b, 2, b=3) == 5
    code = ("from flowmatch.engine import run_guarded\n"
            "def main():\n    raise ValueError('boom')\n"
            "run_guarded(main)\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "not reached" not in proc.stdout
    assert "[flowmatch rank 0] failed: ValueError: boom" in proc.stderr and "Traceback" in proc.stderr


# ------------------------------------------------------------------------------------------------- real runs




class Runs:
    """The runs the slow tests share, each started on first use (they cost seconds each on 2 cores)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _single(self, name: str, *args: str) -> tuple[int, str]:
        log = self.root / f"{name}.log"
        (code,), _ = launch([[sys.executable, str(SCRIPT), "--run-dir", str(self.root / name), *args]], [log])
        return code, log.read_text()

    def in_turn(self, runs: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, str]]:
        """The runs one after the other in one launched process (a launch's start-up costs more than a run):
        by name, the process's exit status and the run's own part of the log."""
        args = [a for i, (name, extra) in enumerate(runs.items())
                for a in (["--then"] if i else []) + ["--run-dir", str(self.root / name), *extra]]
        log = self.root / f"{next(iter(runs))}.log"
        (code,), _ = launch([[sys.executable, str(SCRIPT), *args]], [log])
        parts = log.read_text().split(RUN_MARK)[1:]
        return {name: (code, parts[i] if i < len(parts) else "") for i, name in enumerate(runs)}

    def result(self, name: str) -> dict:
        return json.loads((self.root / name / "result.json").read_text())

    @cached_property
    def launched(self) -> dict[str, tuple[list[int], list[Path]]]:
        """The runs that need nothing from another, launched side by side (one after the other, each launch's
        start-up would leave a core of a 2-core machine idle): exit codes and logs by name.

        - resumed: one process killed by SIGKILL in the middle of the step-8 save (after a non-finite window
          before step 2);
        - zero2: 2 processes started without a launcher (the launchers are tests/test_launchers.py's; torchrun's
          own interpreter would cost seconds here), EMA evaluation at 4;
        - zero3: two launchers of one process each, ZeRO-3, 2 micro-batches per update, a non-finite window
          before step 3 and an EMA evaluation at step 4.
        """
        singles = {"resumed": ("--nan-at", "2", "--kill-in-save-at", "8")}
        jobs = {name: ([[sys.executable, str(SCRIPT), "--run-dir", str(self.root / name), *args]],
                       [self.root / f"{name}.log"]) for name, args in singles.items()}
        zero2 = [sys.executable, str(SCRIPT), "--run-dir", str(self.root / "zero2"), "--zero-stage", "2",
                 "--ema-eval-at", "4"]
        jobs["zero2"] = ([zero2, zero2], [self.root / f"zero2-rank{r}.log" for r in range(2)])
        port = str(free_port())
        jobs["zero3"] = ([torchrun("--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr",
                                   "127.0.0.1", "--master_port", port, str(SCRIPT), "--run-dir",
                                   str(self.root / "zero3"), "--zero-stage", "3", "--grad-accum", "2", "--nan-at",
                                   "3", "--ema-eval-at", "4") for i in range(2)],
                         [self.root / f"zero3-node{i}.log" for i in range(2)])
        return launch_jobs(jobs, envs={"zero2": rank_envs(2)})

    @cached_property
    def singles(self) -> dict[str, tuple[int, str]]:
        """The one-process runs: exit status and log by name. ``resumed`` is launched (:attr:`launched`); ``ref``,
        one plain process, ZeRO-0, the trajectory everything else is compared with (EMA evaluation at 4), and
        ``bf16``, the same in bf16, train in this process after the launches (no launch start-up), as launched
        ones do: on one torch thread (train_tiny.main)."""
        out = {"resumed": (self.launched["resumed"][0][0], self.launched["resumed"][1][0].read_text())}
        for name, args in {"ref": ("--ema-eval-at", "4"), "bf16": ("--precision", "bf16")}.items():
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                train_tiny(["--run-dir", str(self.root / name), *args])
            out[name] = (0, log.getvalue())  # a failing run raises here
        return out

    @cached_property
    def reference(self) -> dict:
        code, log = self.singles["ref"]
        assert code == 0, log
        return self.result("ref")

    @cached_property
    def zero2_two_procs(self) -> dict:
        assert_succeeded(self.launched["zero2"])
        return self.result("zero2")

    @cached_property
    def zero3_two_nodes(self) -> dict:
        assert_succeeded(self.launched["zero3"])
        return self.result("zero3")

    @cached_property
    def killed_then_resumed(self) -> tuple[str, str]:
        """Killed by SIGKILL in the middle of the step-8 save (after a non-finite window before step 2), then
        the same command again."""
        code, killed_log = self.singles["resumed"]
        assert code == -9, killed_log
        self.after_kill = sorted(p.name for p in (self.root / "resumed" / "checkpoints").iterdir())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the resume, a ZeRO-0 run, in this process: no launch start-up
            train_tiny(["--run-dir", str(self.root / "resumed")])
        return killed_log, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("engine-runs"))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_same_trajectory(run: dict, ref: dict, run_dir: Path, ref_dir: Path) -> None:
    assert run["losses"].keys() == ref["losses"].keys()
    for step, loss in ref["losses"].items():
        assert math.isclose(run["losses"][step], loss, rel_tol=LOSS_RTOL), (step, run["losses"][step], loss)
        assert run["lrs"][step] == pytest.approx(ref["lrs"][step], rel=1e-12)
        assert run["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=1e-4)
    for name in ("model", "ema"):
        got = load_file(run_dir / "checkpoints" / str(STEPS) / f"{name}.safetensors")
        want = load_file(ref_dir / "checkpoints" / str(STEPS) / f"{name}.safetensors")
        assert _max_abs_diff(got, want) < WEIGHT_ATOL, name


@pytest.mark.slow
def test_zero2_on_two_processes_matches_one_process(runs):
    ref, run = runs.reference, runs.zero2_two_procs
    assert (ref["world_size"], run["world_size"], run["zero_stage"]) == (1, 2, 2)
    _assert_same_trajectory(run, ref, runs.root / "zero2", runs.root / "ref")


@pytest.mark.slow
def test_zero3_on_two_nodes_with_accumulation_matches_one_process(runs):
    ref, run = runs.reference, runs.zero3_two_nodes
    assert (run["world_size"], run["zero_stage"]) == (2, 3)
    _assert_same_trajectory(run, ref, runs.root / "zero3", runs.root / "ref")


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_skips_the_window_on_all_ranks(runs):
    # The script asserts inside the bad window that weights, LR and step count are untouched; the trajectory
    # tests above prove the AdamW moments were too (the run goes on exactly like the reference).
    run = runs.zero3_two_nodes
    assert run["bad_windows_checked"] == 1 and run["skipped"] == 1 and run["optimizer_steps"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reference", "zero2_two_procs", "zero3_two_nodes"])
def test_ema_weights_evaluate_like_a_plain_model_and_come_back(runs, name):
    # Exact restoration of the training weights afterwards is proven by the trajectory tests: these runs
    # evaluate with the EMA at step 4 and must still follow the reference (bitwise, for the resumed run).
    run = getattr(runs, name)
    assert run["ema_vs_live_diff"] > 1e-3  # the EMA really differs from the live weights at step 4
    assert run["ema_eval_max_diff"] < 1e-6 and run["live_eval_max_diff"] < 1e-6


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_is_bit_identical(runs):
    killed_log, resumed_log = runs.killed_then_resumed
    ckpts = runs.root / "resumed" / "checkpoints"
    assert runs.after_kill[0].startswith(".tmp-8-") and runs.after_kill[1:] == ["4"]  # the half-written save
    assert f"resuming from {ckpts / '4'} at step 4" in resumed_log
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "8"]  # the stale .tmp-* is gone
    ref, run = runs.reference, runs.result("resumed")
    assert run["skipped"] == 1  # the skipped window before step 2 was counted and the count restored
    assert {k: run["losses"][k] for k in ("5", "6", "7", "8")} == {k: ref["losses"][k] for k in ("5", "6", "7", "8")}
    for step in (4, 8):
        for name in ("model", "ema"):
            got = load_file(ckpts / str(step) / f"{name}.safetensors")
            want = load_file(runs.root / "ref" / "checkpoints" / str(step) / f"{name}.safetensors")
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (step, name)


@pytest.mark.slow
def test_zero2_two_process_checkpoint_resumes_on_one_zero3_process(runs):
    runs.zero2_two_procs  # noqa: B018 - writes the checkpoint
    run_dir, damaged_dir = runs.root / "regrouped", runs.root / "damaged-optimizer"
    shutil.copytree(runs.root / "zero2" / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    # The same checkpoint with its optimizer's whole tensors damaged: it still resumes, resetting the moments only.
    shutil.copytree(runs.root / "zero2" / "checkpoints" / "4", damaged_dir / "checkpoints" / "4")
    (damaged_dir / "checkpoints" / "4" / "state" / "optim-full-00001.safetensors").write_bytes(b"not tensors")
    layout = ("--zero-stage", "3", "--check-loaded")
    logs = runs.in_turn({"regrouped": layout, "damaged-optimizer": layout})
    code, log = logs["regrouped"]
    assert code == 0, log
    assert "restart from zero" not in log and "re-sharded from their whole tensors" in log
    run = runs.result("regrouped")
    assert run["loaded_weights_match"] and run["loaded_ema_match"]  # bitwise, through ZeRO-3 partitioning
    # The AdamW moments were re-sharded, not reset: the whole rest of the run follows the reference (with reset
    # moments the losses of steps 6-8 move by percents).
    for step in ("5", "6", "7", "8"):
        assert run["losses"][step] == pytest.approx(runs.reference["losses"][step], rel=LOSS_RTOL), step
        assert run["lrs"][step] == pytest.approx(runs.reference["lrs"][step])  # schedule position restored
    code, log = logs["damaged-optimizer"]
    assert code == 0, log
    assert "state/optim-full-00001.safetensors" in log and "AdamW moments restart from zero (exp_avg" in log
    damaged = runs.result("damaged-optimizer")
    assert damaged["loaded_weights_match"] and damaged["loaded_ema_match"]
    assert damaged["lrs"]["5"] == pytest.approx(runs.reference["lrs"]["5"])
    assert damaged["losses"]["8"] != pytest.approx(runs.reference["losses"]["8"], rel=1e-3)
    assert "optimizer for other layouts" in format_check(check_run(damaged_dir))


@pytest.mark.slow
def test_bf16_without_zero_follows_the_fp32_trajectory(runs):
    # bf16 rounding moves the losses by <= 0.3% here (measured). DeepSpeed's bf16 wrapper without ZeRO steps
    # AdamW once on zero gradients at start-up; left in, that skews AdamW's bias correction and moves the
    # losses by 1.4-3%, which this tolerance catches.
    code, log = runs.singles["bf16"]
    assert code == 0, log
    ref, run = runs.reference, runs.result("bf16")
    for step, loss in ref["losses"].items():
        assert math.isclose(run["losses"][step], loss, rel_tol=1e-2), (step, run["losses"][step], loss)


@pytest.mark.slow
def test_one_rank_failing_ends_every_rank_promptly(tmp_path):
    envs = rank_envs(2)
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    # Rank 1 raises after step 2 while rank 0 sleeps for a minute outside any collective: only the failure
    # notice can stop rank 0 early (a rank blocked in a gloo collective would also see the dropped connection).
    cmd = [sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "run"), "--zero-stage", "2", "--fail-rank", "1",
           "--fail-at", "2", "--others-sleep", "60", "--timeout", "120"]
    codes, exits = launch_timed([cmd, cmd], logs, envs=envs)
    out0, out1 = (log.read_text() for log in logs)
    assert codes == [1, 1], (out0, out1)
    # Rank 0 follows rank 1 within seconds; sleeping on, it would exit ~60 s later (measured from the exits, not
    # the launch: start-up on a busy machine varies by tens of seconds).
    assert exits[0] - exits[1] < 30, exits
    assert "RuntimeError: injected failure at step 2" in out1 and "Traceback" in out1
    assert "[flowmatch rank 0] stopping because rank 1 failed: RuntimeError: injected failure at step 2" in out0


def test_a_single_process_group_opens_no_port():
    """Bug caught: a plain one-process run rendezvousing over TCP on the free port it picked, which another run
    starting at the same moment can take first (EADDRINUSE)."""
    import torch.distributed as dist

    with _engine() as engine:
        assert engine.world_size == 1
        store = dist.distributed_c10d._get_default_store()  # the group wraps it in a PrefixStore
        assert isinstance(getattr(store, "underlying_store", store), dist.HashStore)
