"""benchmarks/formulations.py times each formulation first and trains it for the whole lr schedule that fits the
budget: a slower formulation gets fewer steps, not a schedule cut off part-way."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("formulations_benchmark",
                                               Path(__file__).parents[1] / "benchmarks" / "formulations.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["formulations_benchmark"] = bench
_SPEC.loader.exec_module(bench)

TINY = ["model.preset=tiny", "train.batch_size=8", "data.num_workers=0", "logging.tensorboard=false",
        "sampling.per_prompt=1", "sampling.steps=2", "train.ema_profiles=[]", "train.ema_snapshot_every=0"]


def test_the_plan_fits_the_whole_schedule_in_the_budget():
    fast = bench.plan_steps(bench.Calibration(0.1, 10.0), 60.0, 500, 100)
    assert (fast.max_steps, fast.warmup_steps) == (500, 100)  # fits: the recipe's schedule, never more
    slow = bench.plan_steps(bench.Calibration(0.25, 10.0), 60.0, 500, 100)
    assert (slow.max_steps, slow.warmup_steps) == (200, 40)  # (60 - 10) / 0.25 steps, warm-up 20% as the recipe's
    assert 10.0 + slow.max_steps * 0.25 <= 60.0
    assert bench.plan_steps(bench.Calibration(5.0, 100.0), 60.0, 500, 100).max_steps == 1


def test_calibration_times_the_steady_steps_and_the_fixed_cost(tmp_path, monkeypatch):
    def fake_run(name, cmd, budget_s):
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        assert "train.max_steps=8" in cmd and "train.log_every=1" in cmd and budget_s is None
        run_dir.mkdir(parents=True)
        # step 1 at 100 s, then 3 s for the (warm-up) step 2, then 0.5 s a step
        times = [100.0, 103.0] + [103.0 + 0.5 * i for i in range(1, 7)]
        rows = [{"step": 1, "time": 99.0, "precision": "fp32"}]
        rows += [{"step": s, "time": t, "loss": 0.1} for s, t in zip(range(1, 9), times)]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return 24.0

    monkeypatch.setattr(bench, "run_train", fake_run)
    cal = bench.calibrate("rf-lognorm", bench.parse_args(["--calibration-steps", "8", "--out", str(tmp_path)]))
    assert cal.seconds_per_step == pytest.approx(0.5) and cal.overhead_s == pytest.approx(20.0)


def test_the_planned_schedule_reaches_the_budgeted_run(tmp_path, monkeypatch):
    calls = []

    def fake_run(name, cmd, budget_s):
        calls.append((cmd, budget_s))
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "time": 1.0, "loss": 0.1}))
        return 30.0

    monkeypatch.setattr(bench, "run_train", fake_run)
    monkeypatch.setattr(bench, "calibrate", lambda name, args: bench.Calibration(0.5, 20.0))
    args = bench.parse_args(["--budget", "70", "--out", str(tmp_path), "optim.warmup_steps=50"])
    run = bench.train_for("ddpm-unet", args)
    (cmd, budget_s), = calls
    assert budget_s == 70  # the budget still stops the run
    assert cmd.index("train.max_steps=100") > cmd.index("optim.warmup_steps=50")  # after the user's overrides
    assert "optim.warmup_steps=10" in cmd and cmd.index("optim.warmup_steps=10") > cmd.index("optim.warmup_steps=50")
    assert (run.plan.max_steps, run.steps, run.seconds) == (100, 3, 30.0)


@pytest.mark.slow  # real calibration and training runs of the CLI
def test_the_benchmark_calibrates_trains_and_judges_for_real(tmp_path, digit_shards, capsys):
    results = bench.main(["--only", "rf-lognorm", "--budget", "300", "--calibration-steps", "4", "--steps", "1",
                          "--samples", "1", "--likelihood-samples", "0", "--shards", str(digit_shards),
                          "--out", str(tmp_path), *TINY, "train.max_steps=5", "optim.warmup_steps=2"])
    (row,) = results
    assert (row["train_steps"], row["planned_steps"], row["warmup_steps"]) == (5, 5, 2)
    assert row["seconds_per_step"] > 0 and row["train_seconds"] > 0
    assert (tmp_path / "rf-lognorm-calibration" / "checkpoints" / "4").is_dir()
    out = capsys.readouterr().out
    assert "train.max_steps=5" in out and "5 of 5 steps" in out and "s/step" in out
