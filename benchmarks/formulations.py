"""The digits job under each diffusion formulation, at the same training budget and seed, judged alike.

Rerun of the SD3 paper's comparison (Esser et al. 2024, section 5.1) on the digits task:

- ``rf-lognorm``: recipes/digits.yaml as shipped (rectified flow, logit-normal t, velocity, MMDiT);
- ``eps-linear``: the same MMDiT, eps-prediction on DDPM's linear VP path, t uniform;
- ``eps-cosine``: eps-prediction on the cosine VP path;
- ``v-cosine``: v-prediction on the cosine VP path;
- ``ddpm-unet``: recipes/digits-ddpm.yaml (diffusers' U-Net, eps, linear VP).

Each formulation is first timed by a short calibration run (``--calibration-steps`` steps of `flowmatch train`, in
its own run directory): its seconds per step (the median step after the first few) and its fixed cost (start-up,
the final validation and checkpoint: the calibration's wall clock less its steps). Then it trains with
`flowmatch train` in its own process for the steps that fit ``--budget`` seconds of wall clock, at most the
recipe's ``train.max_steps`` (500), with ``train.max_steps`` set to that count and ``optim.warmup_steps`` scaled
alike, so that each formulation runs its whole lr schedule (warm-up, then cosine decay to the end) however slow its
steps; a slower formulation trains fewer steps rather than stopping part-way through a 500-step schedule. The
budget is a hard stop too (SIGTERM, then a checkpoint, like a preemption) should the calibration have been too
optimistic. Then `flowmatch eval`'s judge scores its default weights at 4, 8, 20 and 50 steps: the Euler ODE
solver for all, DDIM and the ancestral sampler too on the VP paths (with x0 clamped to [-1, 1],
``sampling.clip_x0``, as DDPM); held-out bits/dim on every path (the rectified path's solve starts at t = 0, a VP
path's at t = 1e-3, where its velocity is finite: ``Formulation.likelihood_start``, after Song et al. 2021). One
table is printed (and written as JSON with ``--json``). Run it on a quiet machine:

    python benchmarks/formulations.py --budget 130 --shards data/digits --out runs/formulations
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

FORMULATIONS: dict[str, tuple[str, list[str]]] = {
    "rf-lognorm": ("recipes/digits.yaml", []),
    "eps-linear": ("recipes/digits.yaml", ["flow.path=vp_linear", "flow.prediction=eps", "flow.time_dist=uniform",
                                           "sampling.clip_x0=1.0"]),
    "eps-cosine": ("recipes/digits.yaml", ["flow.path=vp_cosine", "flow.prediction=eps", "flow.time_dist=uniform",
                                           "sampling.clip_x0=1.0"]),
    "v-cosine": ("recipes/digits.yaml", ["flow.path=vp_cosine", "flow.prediction=v", "flow.time_dist=uniform",
                                         "sampling.clip_x0=1.0"]),
    "ddpm-unet": ("recipes/digits-ddpm.yaml", []),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=130.0,
                        help="seconds of wall clock per training run (start-up included); 130 = digits' 500 steps "
                             "on a quiet 2-core CPU")
    parser.add_argument("--calibration-steps", type=int, default=12,
                        help="steps of the calibration run that times each formulation before its budgeted run")
    parser.add_argument("--only", default=",".join(FORMULATIONS), help="comma-separated formulations to run")
    parser.add_argument("--shards", default=None, help="data.shards (default: the recipes')")
    parser.add_argument("--out", default="runs/formulations", help="parent of the run directories")
    parser.add_argument("--steps", default="4,8,20,50", help="sampler step counts to judge at")
    parser.add_argument("--samples", type=int, default=50, help="images per class prompt")
    parser.add_argument("--likelihood-samples", type=int, default=16, help="held-out images for bits/dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every run")
    return parser.parse_args(argv)


@dataclass
class Calibration:
    """A formulation's measured speed: steady seconds per optimizer step and the fixed cost of a run (start-up,
    final validation, checkpoint) in seconds."""

    seconds_per_step: float
    overhead_s: float


@dataclass
class Plan:
    """The training a formulation gets within the budget: its whole lr schedule of ``max_steps`` steps."""

    max_steps: int
    warmup_steps: int


@dataclass
class Trained:
    """What a budgeted training run did: its directory, the plan, the steps it trained and its wall clock."""

    run_dir: Path
    plan: Plan
    calibration: Calibration
    steps: int
    seconds: float


def recipe_schedule(name: str, args: argparse.Namespace) -> tuple[int, int]:
    """The formulation's (train.max_steps, optim.warmup_steps) with the benchmark's overrides applied."""
    from flowmatch.config import load_recipe

    recipe_path, extra = FORMULATIONS[name]
    recipe = load_recipe(ROOT / recipe_path, [*extra, *args.overrides])
    return recipe.train.max_steps, recipe.optim.warmup_steps


def plan_steps(cal: Calibration, budget_s: float, recipe_steps: int, recipe_warmup: int) -> Plan:
    """The most steps whose run fits ``budget_s`` (fixed cost included), at most the recipe's; the warm-up keeps
    its fraction of the recipe's schedule."""
    fit = math.floor((budget_s - cal.overhead_s) / cal.seconds_per_step)
    steps = max(1, min(recipe_steps, fit))
    return Plan(steps, min(steps - 1, round(recipe_warmup * steps / recipe_steps)) if recipe_warmup else 0)


def train_command(name: str, run_dir: Path, args: argparse.Namespace, *extra_overrides: str) -> list[str]:
    recipe, extra = FORMULATIONS[name]
    cmd = [sys.executable, "-m", "flowmatch.cli", "train", str(ROOT / recipe), f"run_dir={run_dir}",
           f"train.seed={args.seed}", "logging.progress=false", *extra, *args.overrides, *extra_overrides]
    return cmd + ([f"data.shards={args.shards}"] if args.shards else [])


def run_train(name: str, cmd: list[str], budget_s: Optional[float]) -> float:
    """Run `flowmatch train` (stopped by SIGTERM, like a preemption, after ``budget_s``); its wall clock in s."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # stops after the current step, with a checkpoint
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: flowmatch train exited with {proc.returncode}:\n{out}")
    return time.time() - started


def logged_steps(run_dir: Path) -> dict[int, float]:
    """step -> wall-clock time of its training log line (RUN_DIR/metrics.jsonl)."""
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            times[row["step"]] = row["time"]
    return times


def calibrate(name: str, args: argparse.Namespace) -> Calibration:
    """Time ``--calibration-steps`` steps of the formulation, logging every step, in ``OUT/NAME-calibration``."""
    run_dir = Path(args.out) / f"{name}-calibration"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it or pass another --out")
    n = args.calibration_steps
    if n < 4:
        raise SystemExit("--calibration-steps must be >= 4 (the first steps warm up and are not timed)")
    wall = run_train(name, train_command(name, run_dir, args, f"train.max_steps={n}", "train.log_every=1"), None)
    times = logged_steps(run_dir)
    if sorted(times) != list(range(1, n + 1)):
        raise SystemExit(f"{name}: the calibration run logged steps {sorted(times)}, not 1..{n}")
    skip = max(1, n // 4)  # the first steps pay for allocations and warm-up
    per_step = statistics.median(times[i + 1] - times[i] for i in range(skip, n))
    return Calibration(per_step, max(0.0, wall - n * per_step))


def train_for(name: str, args: argparse.Namespace) -> Trained:
    """Calibrate, then train one formulation for its whole schedule within the budget (a fresh run directory)."""
    run_dir = Path(args.out) / name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it or pass another --out (a resumed run is another budget)")
    cal = calibrate(name, args)
    plan = plan_steps(cal, args.budget, *recipe_schedule(name, args))
    print(f"{name}: {cal.seconds_per_step:.3f} s/step and {cal.overhead_s:.0f} s fixed cost measured -> "
          f"train.max_steps={plan.max_steps}, optim.warmup_steps={plan.warmup_steps}", flush=True)
    seconds = run_train(name, train_command(name, run_dir, args, f"train.max_steps={plan.max_steps}",
                                            f"optim.warmup_steps={plan.warmup_steps}"), args.budget)
    steps = max(logged_steps(run_dir), default=0)
    print(f"{name}: {steps} of {plan.max_steps} steps in {seconds:.0f} s", flush=True)
    return Trained(run_dir, plan, cal, steps, seconds)


def judge(name: str, run_dir: Path, steps: list[int], args: argparse.Namespace) -> dict:
    from flowmatch.evaluate import evaluate
    from flowmatch.pipeline import load_pipeline

    pipe = load_pipeline(run_dir)
    samplers = ["euler"] + (["ddim", "ancestral"] if pipe.formulation.path.variance_preserving else [])
    report = evaluate(run_dir, pipeline=pipe, steps=steps, solvers=samplers, samples_per_prompt=args.samples,
                      likelihood_samples=args.likelihood_samples)
    return {"rows": [dict(solver=r.solver, steps=r.steps, **r.metrics) for r in report.scores.rows],
            "bits_per_dim": report.bits_per_dim}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    results = []
    for name in args.only.split(","):
        if name not in FORMULATIONS:
            raise SystemExit(f"--only: unknown formulation {name!r}; choose from {', '.join(FORMULATIONS)}")
        run = train_for(name, args)
        results.append(dict(formulation=name, train_steps=run.steps, planned_steps=run.plan.max_steps,
                            warmup_steps=run.plan.warmup_steps, train_seconds=run.seconds,
                            seconds_per_step=run.calibration.seconds_per_step,
                            **judge(name, run.run_dir, steps, args)))
    print(f"\nbudget {args.budget:.0f} s per run (each its whole lr schedule: the steps its calibrated s/step fit), "
          f"seed {args.seed}, {args.samples} images per digit, guidance as recipes/digits.yaml")
    print(f"{'formulation':<11} {'s/step':>6} {'trained':>14} {'sampler':>9} "
          + " ".join(f"{f'acc@{s}':>7}" for s in steps) + " " + " ".join(f"{f'FD@{s}':>7}" for s in steps)
          + f" {'bits/dim':>8}")
    for res in results:
        by_solver: dict[str, dict[int, dict]] = {}
        for row in res["rows"]:
            by_solver.setdefault(row["solver"], {})[row["steps"]] = row
        for i, (solver, rows) in enumerate(by_solver.items()):
            bpd = res["bits_per_dim"]
            head = (f"{res['formulation']:<11} {res['seconds_per_step']:>6.3f} "
                    f"{res['train_steps']:>5} in {res['train_seconds']:>4.0f} s" if i == 0
                    else f"{'':<11} {'':>6} {'':>14}")
            print(f"{head} {solver:>9} " + " ".join(f"{rows[s]['accuracy']:>7.3f}" for s in steps) + " "
                  + " ".join(f"{rows[s]['frechet']:>7.1f}" for s in steps)
                  + (f" {bpd:>8.2f}" if i == 0 and bpd is not None else f" {'-':>8}"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
