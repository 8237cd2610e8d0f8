"""The digits job under each diffusion formulation, at the same training budget and seed, judged alike.

Rerun of the SD3 paper's comparison (Esser et al. 2024, section 5.1) on the digits task:

- ``rf-lognorm``: recipes/digits.yaml as shipped (rectified flow, logit-normal t, velocity, MMDiT);
- ``eps-linear``: the same MMDiT, eps-prediction on DDPM's linear VP path, t uniform;
- ``eps-cosine``: eps-prediction on the cosine VP path;
- ``v-cosine``: v-prediction on the cosine VP path;
- ``ddpm-unet``: recipes/digits-ddpm.yaml (diffusers' U-Net, eps, linear VP).

Each trains with `flowmatch train` in its own process until the recipe's ``train.max_steps`` (500) or ``--budget``
seconds of wall clock, whichever comes first (the budget stops it like a preemption: SIGTERM, then a checkpoint),
then `flowmatch eval`'s judge scores its default weights at 4, 8, 20 and 50 steps: the Euler ODE solver for all,
DDIM and the ancestral sampler too on the VP paths (with x0 clamped to [-1, 1], ``sampling.clip_x0``, as DDPM); held-out bits/dim where the path has a finite velocity at
t = 0 (rectified). One table is printed (and written as JSON with ``--json``). Run it on a quiet machine:

    python benchmarks/formulations.py --budget 130 --shards data/digits --out runs/formulations
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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

_SUMMARY = re.compile(r"steps \d+ -> (\d+) in (\d+) s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=130.0,
                        help="seconds of wall clock per training run (start-up included); 130 = digits' 500 steps "
                             "on a quiet 2-core CPU")
    parser.add_argument("--only", default=",".join(FORMULATIONS), help="comma-separated formulations to run")
    parser.add_argument("--shards", default=None, help="data.shards (default: the recipes')")
    parser.add_argument("--out", default="runs/formulations", help="parent of the run directories")
    parser.add_argument("--steps", default="4,8,20,50", help="sampler step counts to judge at")
    parser.add_argument("--samples", type=int, default=50, help="images per class prompt")
    parser.add_argument("--likelihood-samples", type=int, default=16, help="held-out images for bits/dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every run")
    return parser.parse_args()


def train_for(name: str, args: argparse.Namespace) -> tuple[Path, int, float]:
    """Train one formulation (resuming is off: a fresh run directory); returns (run_dir, steps, training s)."""
    recipe, extra = FORMULATIONS[name]
    run_dir = Path(args.out) / name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it or pass another --out (a resumed run is another budget)")
    cmd = [sys.executable, "-m", "flowmatch.cli", "train", str(ROOT / recipe), f"run_dir={run_dir}",
           f"train.seed={args.seed}", "logging.progress=false", *extra, *args.overrides]
    if args.shards:
        cmd.append(f"data.shards={args.shards}")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=args.budget)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # stops after the current step, with a checkpoint
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: flowmatch train exited with {proc.returncode}")
    found = _SUMMARY.search(out or "")
    if found is None:
        raise SystemExit(f"{name}: no training summary in the output:\n{out}")
    print(f"{name}: {found.group(1)} steps, {found.group(2)} s of training ({time.time() - started:.0f} s in all)",
          flush=True)
    return run_dir, int(found.group(1)), float(found.group(2))


def judge(name: str, run_dir: Path, steps: list[int], args: argparse.Namespace) -> dict:
    from flowmatch.evaluate import evaluate
    from flowmatch.pipeline import load_pipeline

    pipe = load_pipeline(run_dir)
    samplers = ["euler"] + (["ddim", "ancestral"] if pipe.formulation.path.variance_preserving else [])
    report = evaluate(run_dir, pipeline=pipe, steps=steps, solvers=samplers, samples_per_prompt=args.samples,
                      likelihood_samples=args.likelihood_samples)
    return {"rows": [dict(solver=r.solver, steps=r.steps, **r.metrics) for r in report.scores.rows],
            "bits_per_dim": report.bits_per_dim}


def main() -> None:
    args = parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    results = []
    for name in args.only.split(","):
        if name not in FORMULATIONS:
            raise SystemExit(f"--only: unknown formulation {name!r}; choose from {', '.join(FORMULATIONS)}")
        run_dir, trained, seconds = train_for(name, args)
        results.append(dict(formulation=name, train_steps=trained, train_seconds=seconds,
                            **judge(name, run_dir, steps, args)))
    print(f"\nbudget {args.budget:.0f} s per run, seed {args.seed}, {args.samples} images per digit, guidance as "
          "recipes/digits.yaml")
    print(f"{'formulation':<11} {'trained':>12} {'sampler':>9} " + " ".join(f"{f'acc@{s}':>7}" for s in steps)
          + " " + " ".join(f"{f'FD@{s}':>7}" for s in steps) + f" {'bits/dim':>8}")
    for res in results:
        by_solver: dict[str, dict[int, dict]] = {}
        for row in res["rows"]:
            by_solver.setdefault(row["solver"], {})[row["steps"]] = row
        for i, (solver, rows) in enumerate(by_solver.items()):
            bpd = res["bits_per_dim"]
            head = (f"{res['formulation']:<11} {res['train_steps']:>5} / {res['train_seconds']:>3.0f} s" if i == 0
                    else f"{'':<11} {'':>12}")
            print(f"{head} {solver:>9} " + " ".join(f"{rows[s]['accuracy']:>7.3f}" for s in steps) + " "
                  + " ".join(f"{rows[s]['frechet']:>7.1f}" for s in steps)
                  + (f" {bpd:>8.2f}" if i == 0 and bpd is not None else f" {'-':>8}"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
