"""Which block layout learns fastest: every text-to-image MMDiT family's layout trained on the digits task at the
same parameter count and the same CPU budget, judged alike.

The layouts come from the family registry (:data:`flowmatch.families.FAMILIES`): each text-to-image family of kind
``mmdit`` (no reference images) gives one, so a new family joins the table without an edit here.

- The family whose preset the recipe names (sd3 for recipes/digits.yaml) is the recipe as shipped: the target.
- Every other family: its registered tiny preset (``Family.tiny``: its layout fields: single-stream blocks,
  refiners, RoPE layout, modulation, SwiGLU and its MLP ratio, biases, GQA, ...) with the recipe's geometry
  (patch, heads, head width, position grid; RoPE axes scaled to the head width), no guidance embedding (a
  distillation input, not a layout), and its block counts (joint ``depth``, and ``single_blocks`` where the family
  has single-stream blocks; refiners as the tiny preset has them) chosen so that its parameter count is within
  ``--tolerance`` (5%) of the target's, the double/single split nearest the tiny preset's. A family that takes no
  pooled text vector gets the same encoder with ``text_encoder.pooling: none`` (the token states are the same).

The budget is CPU time, not wall clock: the machine this runs on is shared, so wall time says more about the
neighbours than about a layout. Every training run is its own `flowmatch train` process with one thread
(``OMP_NUM_THREADS=1``, ``data.num_workers=0``, so the process's CPU time is all the work), and the budget is that
process's CPU seconds (user + system, start-up, final validation and checkpoint included). By default it is the
digits job's own: the target's calibrated cost of the recipe's whole schedule (``train.max_steps`` = 500 steps),
so the shipped recipe trains exactly as it ships; ``--budget-s`` sets another. Each layout is timed by a short
calibration run (``--calibration-steps``, its CPU seconds per step read from /proc as each step is logged, so
Linux only) just before it trains (the target first: its cost sets the budget), then trains the steps that fit
(at most the recipe's), with its lr warm-up and cosine schedule scaled to them, so a slower layout trains fewer
steps of a whole schedule. CPU time is not free of load either: two processes on the hyperthreads of one core
each take longer per step, so a calibration is only valid for the load it ran under, and timing each layout right
before its run keeps the two under the same load. A run past its budget by more than ``--stop-slack`` (25%) is
stopped (SIGTERM and a checkpoint, like a preemption, without the final validation); the table says how many
steps each run reached and how much CPU it used. Then `flowmatch eval`'s judge
(the digits task: prompt accuracy of an independent classifier, paraphrase accuracy, Frechet distance) scores
the default weights at 4, 8 and 20 Euler steps. One table, also written as JSON with ``--json``:

    python benchmarks/layouts.py --shards data/digits --out runs/layouts             # the digits budget
    python benchmarks/layouts.py --budget-s 40 --only sd3,flux,zimage,flux2 --samples 20 --out /tmp/layouts
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from flowmatch.config import Recipe, load_recipe
from flowmatch.families import FAMILIES, Family, family_of
from flowmatch.families.mmdit import KIND
from flowmatch.families.presets import PRESET_FAMILY, preset_values
from flowmatch.models.mmdit import MMDiTConfig

ROOT = Path(__file__).resolve().parents[1]
#: The recipe's MMDiTConfig fields every layout keeps: the width, the tokens and what they are embedded from.
GEOMETRY = ("in_channels", "out_channels", "patch_size", "num_heads", "head_dim", "sample_size",
            "pos_embed_max_size", "time_freq_dim")
#: Fields a tiny preset may set that are no part of a layout (distillation and editing inputs): turned off.
NOT_LAYOUT = dict(guidance_embed=False, references=0, interval_embed=False)
#: Most blocks of one kind the search tries.
MAX_BLOCKS = 24
#: Every training process: one thread, the data read in the process itself (its CPU time is all the work).
ONE_PROCESS = ("data.num_workers=0", "logging.progress=false", "logging.tensorboard=false")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/digits.yaml")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="CPU seconds (one thread) per training process, start-up included; default: the "
                             "recipe's whole schedule at the target layout's calibrated cost")
    parser.add_argument("--calibration-steps", type=int, default=12, help="steps of each layout's timing run")
    parser.add_argument("--only", default=None, help="comma-separated families (default: every layout; the "
                        "recipe's own is the one the others are compared with)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative parameter-count gap")
    parser.add_argument("--stop-slack", type=float, default=0.25,
                        help="stop a run that has used this much more CPU than the budget (a calibration taken under "
                             "lighter load than the run)")
    parser.add_argument("--shards", default=None, help="data.shards (default: the recipe's)")
    parser.add_argument("--out", default="runs/layouts", help="parent of the run directories")
    parser.add_argument("--steps", default="4,8,20", help="Euler step counts to judge at")
    parser.add_argument("--samples", type=int, default=50, help="images per class prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every run")
    return parser.parse_args(argv)


@dataclass
class Layout:
    """One family's layout at the target's size: the recipe overrides that give it and its parameter count."""

    family: str
    overrides: list[str]
    params: int
    blocks: str
    """Block counts, e.g. "4 joint" or "2 joint + 5 single + 1 refiner"."""


def parameter_count(family: Family, cfg: MMDiTConfig) -> int:
    """Parameters of the family's network for ``cfg`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = family.build(cfg)
    return sum(p.numel() for p in model.parameters())


def encoder_sizes(recipe: Recipe) -> dict[str, int]:
    """in_channels, context_dim and pooled_dim the recipe's encoders give (the MiniLM read once, on the CPU)."""
    from flowmatch.encoders.frozen import FrozenEncoders  # loads transformers: only when layouts are built

    return FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels).input_sizes()


def blocks_label(values: dict[str, Any]) -> str:
    parts = [f"{values['depth']} joint"]
    if values.get("single_blocks"):
        parts.append(f"{values['single_blocks']} single")
    if values.get("refiner_layers"):
        parts.append(f"{values['refiner_layers']} refiner")
    return " + ".join(parts)


def adapted(family: Family, target: MMDiTConfig) -> dict[str, Any]:
    """The family's tiny preset with the target's geometry (every MMDiTConfig field, block counts still the
    preset's); ValueError when its RoPE axes cannot be scaled to the target's head width."""
    values = preset_values(family.tiny)
    tiny_head = values["head_dim"]
    values.update({k: getattr(target, k) for k in GEOMETRY}, **NOT_LAYOUT)
    values["context_dim"] = target.context_dim
    values["pooled_dim"] = 0 if values["pooled_dim"] == 0 else target.pooled_dim
    axes = values["rope_axes_dim"]
    if axes is not None:
        scaled = [a * target.head_dim // tiny_head for a in axes]
        if sum(scaled) != target.head_dim or any(a % 2 for a in scaled):
            raise ValueError(f"{family.name}: RoPE axes {axes} of head width {tiny_head} do not scale to the "
                             f"recipe's head width {target.head_dim}")
        values["rope_axes_dim"] = scaled
    values["kv_heads"] = values["kv_heads"] and math.gcd(values["kv_heads"], target.num_heads)
    return values


def match_params(family: Family, values: dict[str, Any], target_params: int, tolerance: float) -> tuple[dict, int]:
    """``values`` with the block counts whose parameter count is nearest ``target_params``: among those within
    ``tolerance``, the double/single split nearest the tiny preset's, then the nearest count."""
    single = values["single_blocks"] > 0
    share = values["depth"] / (values["depth"] + values["single_blocks"])
    found = []
    for depth in range(1, MAX_BLOCKS + 1):
        for singles in (range(1, MAX_BLOCKS + 1) if single else [0]):
            cfg = MMDiTConfig(**{**values, "depth": depth, "single_blocks": singles})
            params = parameter_count(family, cfg)
            gap = abs(params / target_params - 1)
            found.append((gap > tolerance, abs(depth / (depth + singles) - share), gap, depth, singles, params))
            if params > target_params * (1 + tolerance):
                break  # more single blocks only grow it
        if found[-1][3:5] == (depth, 1 if single else 0) and found[-1][-1] > target_params * (1 + tolerance):
            break  # the fewest blocks at this depth are too many already: more joint blocks only grow it
    _, _, _, depth, singles, params = min(found)
    return {**values, "depth": depth, "single_blocks": singles}, params


def model_overrides(family: Family, values: dict[str, Any]) -> list[str]:
    """Recipe overrides that turn the recipe's model section into ``values`` (sizes the encoders give are left to
    them, as the recipe leaves them)."""
    base = preset_values(family.tiny)
    out = [f"model.preset={family.tiny}", f"model.family={family.name}"]
    for key, value in values.items():
        if key in ("preset", "in_channels", "context_dim") or (key == "pooled_dim" and value != 0):
            continue
        if value != base[key]:
            out.append(f"model.{key}={json.dumps(value)}")  # JSON is YAML: lists, true/false, null
    return out


def layouts(recipe_path: str, overrides: list[str], tolerance: float, only: Optional[list[str]] = None
            ) -> tuple[str, dict[str, Layout]]:
    """The target family's name and every layout (or ``only`` those), the target first."""
    recipe = load_recipe(recipe_path, overrides)
    sizes = encoder_sizes(recipe)
    target_family = PRESET_FAMILY.get(recipe.model.preset) or family_of(recipe.model)
    target = dataclasses.replace(recipe.model.architecture(), **sizes)
    target_params = parameter_count(target_family, target)
    out = {target_family.name: Layout(target_family.name, [], target_params,
                                      blocks_label(dataclasses.asdict(target)))}
    for family in FAMILIES.values():
        if family is target_family or family.kind != KIND or family.capabilities.references:
            continue
        values, params = match_params(family, adapted(family, target), target_params, tolerance)
        extra = ["text_encoder.pooling=none"] if values["pooled_dim"] == 0 and sizes["pooled_dim"] else []
        out[family.name] = Layout(family.name, model_overrides(family, values) + extra, params, blocks_label(values))
    if only:
        unknown = [n for n in only if n not in out]
        if unknown:
            raise SystemExit(f"--only: no layout {unknown[0]!r}; choose from {', '.join(out)}")
        out = {n: lay for n, lay in out.items() if n in only}
    return target_family.name, out


# --- training by CPU time -------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """A layout's cost: CPU seconds per optimizer step (median after the first few) and the fixed CPU cost of a
    run (start-up, final validation, checkpoint)."""

    cpu_per_step: float
    overhead_s: float


@dataclass
class Run:
    """What one `flowmatch train` process did: the CPU seconds of each logged step and its total CPU seconds."""

    step_cpu: dict[int, float]
    cpu_s: float
    stopped: bool
    """The budget ran out and the run was stopped (SIGTERM, with a checkpoint)."""


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train_command(recipe: str, run_dir: Path, layout: Layout, args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "flowmatch.cli", "train", str(ROOT / recipe), f"run_dir={run_dir}",
           f"train.seed={args.seed}", *ONE_PROCESS, *layout.overrides, *args.overrides, *extra]
    return cmd + ([f"data.shards={args.shards}"] if args.shards else [])


def run_train(cmd: list[str], run_dir: Path, budget_s: Optional[float]) -> Run:
    """Run `flowmatch train` with one thread, noting its CPU time as each step is logged; SIGTERM (a checkpoint,
    then exit) once it has used ``budget_s`` CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = os.times()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics, seen, step_cpu, stopped = run_dir / "metrics.jsonl", 0, {}, False
    while proc.poll() is None:
        try:
            cpu = process_cpu(proc.pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break  # exited between poll and read
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                row = json.loads(line) if line.endswith("}") else {}
                if "loss" in row:
                    step_cpu[row["step"]] = cpu
            seen = len(lines) if lines and lines[-1].endswith("}") else max(0, len(lines) - 1)
        if budget_s is not None and cpu > budget_s and not stopped:
            proc.send_signal(signal.SIGTERM)  # stops after the current step, with a checkpoint
            stopped = True
        time.sleep(0.05)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"flowmatch train exited with {proc.returncode}: {' '.join(cmd)}\n{out}")
    after = os.times()
    return Run(step_cpu, (after.children_user - before.children_user) + (after.children_system
                                                                          - before.children_system), stopped)


def calibrate(recipe: str, layout: Layout, args: argparse.Namespace) -> Calibration:
    """Time ``--calibration-steps`` steps of the layout, logging every step, in ``OUT/NAME-calibration``."""
    run_dir = Path(args.out) / f"{layout.family}-calibration"
    n = args.calibration_steps
    if n < 4:
        raise SystemExit("--calibration-steps must be >= 4 (the first steps warm up and are not timed)")
    run = run_train(train_command(recipe, run_dir, layout, args, f"train.max_steps={n}", "train.log_every=1"),
                    run_dir, None)
    skip = max(1, n // 4)  # the first steps pay for allocations and warm-up
    timed = [run.step_cpu[i + 1] - run.step_cpu[i] for i in range(skip, n) if i in run.step_cpu
             and i + 1 in run.step_cpu]
    if not timed:
        raise SystemExit(f"{layout.family}: the calibration run logged no consecutive steps (saw "
                         f"{sorted(run.step_cpu)})")
    per_step = statistics.median(timed)
    return Calibration(per_step, max(0.0, run.cpu_s - n * per_step))


def planned_steps(cal: Calibration, budget_s: float, recipe_steps: int, recipe_warmup: int) -> tuple[int, int]:
    """(train.max_steps, optim.warmup_steps): the most steps that fit the budget, at most the recipe's, the warm-up
    keeping its share of the schedule."""
    steps = max(1, min(recipe_steps, math.floor((budget_s - cal.overhead_s) / cal.cpu_per_step + 1e-9)))
    return steps, (min(steps - 1, round(recipe_warmup * steps / recipe_steps)) if recipe_warmup else 0)


def final_step(run_dir: Path) -> int:
    """The step a run's newest checkpoint holds (a stopped run's checkpoint falls between logged steps)."""
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    if not steps:
        raise SystemExit(f"{run_dir} wrote no checkpoint")
    return max(steps)


def judge(run_dir: Path, steps: list[int], samples: int) -> dict[int, dict[str, float]]:
    """`flowmatch eval`'s metrics of the run's default weights: Euler step count -> metrics."""
    from flowmatch.evaluate import evaluate  # the judge's model stack: only once something has trained

    report = evaluate(run_dir, steps=steps, solvers=["euler"], samples_per_prompt=samples, likelihood_samples=0)
    return {r.steps: r.metrics for r in report.scores.rows}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the judge too: the machine is shared
    overrides = [*args.overrides, *([f"data.shards={args.shards}"] if args.shards else [])]
    target, table = layouts(args.recipe, overrides, args.tolerance, args.only.split(",") if args.only else None)
    recipe = load_recipe(args.recipe, overrides)
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: remove it or pass another --out (a resumed run is another budget)")
    from flowmatch.data import ensure_shards  # builds the digits shards when missing

    ensure_shards(recipe.data)
    steps = [int(s) for s in args.steps.split(",")]
    budget = args.budget_s
    if budget is None and target not in table:
        raise SystemExit(f"the default budget is {target}'s (the recipe's) schedule: add {target} to --only or "
                         "give --budget-s")
    results = []
    for name in sorted(table, key=lambda n: n != target):  # the target first: its calibration sets the budget
        lay = table[name]
        cal = calibrate(args.recipe, lay, args)
        if budget is None:  # the digits job's budget: the shipped recipe's whole schedule
            budget = cal.overhead_s + recipe.train.max_steps * cal.cpu_per_step
        max_steps, warmup = planned_steps(cal, budget, recipe.train.max_steps, recipe.optim.warmup_steps)
        run_dir = Path(args.out) / name
        run = run_train(train_command(args.recipe, run_dir, lay, args, f"train.max_steps={max_steps}",
                                      f"optim.warmup_steps={warmup}"), run_dir, budget * (1 + args.stop_slack))
        trained = final_step(run_dir)
        print(f"{name}: {cal.cpu_per_step:.3f} CPU s/step, {cal.overhead_s:.0f} CPU s fixed -> {trained} of "
              f"{max_steps} steps in {run.cpu_s:.0f} CPU s{' (stopped)' if run.stopped else ''}", flush=True)
        results.append(dict(layout=name, blocks=lay.blocks, params=lay.params, overrides=lay.overrides,
                            steps_per_cpu_s=1 / cal.cpu_per_step, planned_steps=max_steps,
                            trained_steps=trained, cpu_s=run.cpu_s, stopped=run.stopped,
                            metrics=judge(run_dir, steps, args.samples)))
    print_table(results, steps, budget, args, target)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def print_table(results: list[dict], steps: list[int], budget: float, args: argparse.Namespace, target: str) -> None:
    load = os.getloadavg()[0]
    print(f"\nbudget {budget:.0f} CPU s per training process (one thread; wall time is not compared: load average "
          f"{load:.1f} on {os.cpu_count()} cores), seed {args.seed}, {args.samples} images per digit, Euler, "
          f"guidance as {args.recipe}; params within {args.tolerance:.0%} of {target}'s")
    cols = [f"acc@{s}" for s in steps] + [f"para@{s}" for s in steps] + [f"FD@{s}" for s in steps]
    ref = next((r["params"] for r in results if r["layout"] == target), None)
    print(f"{'layout':<10} {'blocks':<28} {'params':>9} {'vs ' + target:>7} {'steps/CPU-s':>11} {'trained':>7} "
          f"{'CPU s':>6} "
          + " ".join(f"{c:>7}" for c in cols))
    for r in results:
        m = r["metrics"]
        vals = ([f"{m[s]['accuracy']:>7.3f}" for s in steps] + [f"{m[s]['paraphrase_accuracy']:>7.3f}" for s in steps]
                + [f"{m[s]['frechet']:>7.1f}" for s in steps])
        gap = f"{r['params'] / ref - 1:+.1%}" if ref else "-"
        print(f"{r['layout']:<10} {r['blocks']:<28} {r['params']:>9,} {gap:>7} {r['steps_per_cpu_s']:>11.2f} "
              f"{r['trained_steps']:>7} {r['cpu_s']:>6.0f} " + " ".join(vals))
    last, base = steps[-1], next((r["metrics"][steps[-1]] for r in results if r["layout"] == target), None)
    if base is None:
        return
    better = [r["layout"] for r in results if r["layout"] != target
              and r["metrics"][last]["accuracy"] >= base["accuracy"]
              and r["metrics"][last]["frechet"] < base["frechet"]]
    print(f"beats the recipe ({target}) at {last} steps (accuracy as high, Frechet lower): "
          + (", ".join(better) if better else "none"))


if __name__ == "__main__":
    main()
