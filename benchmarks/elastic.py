"""Resuming across a change of layout (world size, ZeRO stage): how far the resumed run strays, on CPU with torchrun.

For each case SRC -> DST of the matrix, a run of layout SRC saves a checkpoint after `--resume-at` updates; a run
of layout DST resumes from it, at once saves its re-sharded optimizer state again (its consolidated whole
tensors), and trains `--after` more updates. Reported per case and precision:

- `vs dst`: the largest relative difference of the per-update losses after the resume from those of an
  uninterrupted run of layout DST (floating-point reduction order differs between layouts, nothing else);
- `vs src`: the same against the uninterrupted run of layout SRC, and `src~dst`: between those two uninterrupted
  runs over the same updates (what the layouts differ by anyway). In bf16 ZeRO-3 builds the weights in bf16
  (``zero.Init``), so its fp32 masters start from bf16-rounded values and its runs differ from the other stages'
  by percents from the first update: a resume is exact when `vs src` (or `vs dst`) stays at the fp32 level;
- `moments`: the largest absolute difference between the AdamW moments and fp32 masters the SRC run saved and
  those the DST run holds after loading them (0 = bitwise);
- `reset`: whether the resume reported resetting the optimizer state (it must not).

Every run draws its data from the global batch index alone (one generator per update), so all layouts see the
same samples, whatever rank they land on.

    python benchmarks/elastic.py                   # the whole matrix, fp32 and bf16 (about 12 launches)
    python benchmarks/elastic.py --cases 2z2-1z0 --precisions fp32 --after 3

With ``--cache SHARDS --recipe R`` it times instead a feature-cache build (`flowmatch-data encode`) by one process
and by `--cache-ranks` torchrun ranks, and says whether the two caches are byte-identical:

    python benchmarks/elastic.py --cache data/digits --recipe recipes/digits-latent.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (processes, ZeRO stage) -> (processes, ZeRO stage), named "<procs>z<stage>-<procs>z<stage>".
CASES = {"2z2-1z0": ((2, 2), (1, 0)), "1z0-2z3": ((1, 0), (2, 3)), "2z3-2z2": ((2, 3), (2, 2))}
GLOBAL_BATCH, DIM, WIDTH = 8, 12, 37  # 37: sizes no world size here divides, so ZeRO-3 pads its last slices


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--resume-at", type=int, default=4, help="updates before the checkpoint")
    p.add_argument("--after", type=int, default=10, help="updates compared after the resume")
    p.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--cache", default=None, help="raw shards: time a cache build instead of the matrix")
    p.add_argument("--recipe", default="recipes/digits-latent.yaml", help="the recipe of --cache")
    p.add_argument("--cache-ranks", type=int, default=2)
    # One run of the worker, under torchrun (internal).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--resume-from", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One training run: `--resume-at` + `--after` updates, a checkpoint after `--resume-at` (fresh runs), or a
    resume from `--resume-from` that first saves the loaded state to RUN_DIR/reloaded."""
    import logging

    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from flowmatch.checkpoint import load_checkpoint, save_checkpoint
    from flowmatch.engine import DistributedConfig, Engine, OptimConfig, run_guarded

    def main() -> None:
        run_dir = Path(args.run_dir)
        engine = Engine(DistributedConfig(zero_stage=args.zero_stage, precision=args.precision,
                                          zero3_persistence_threshold=10))
        logging.basicConfig(level=logging.WARNING, format=f"[rank {engine.rank}] %(levelname)s %(name)s: %(message)s")
        micro = GLOBAL_BATCH // engine.world_size
        torch.manual_seed(0)
        with engine.model_init():
            model = nn.Sequential(nn.Linear(DIM, WIDTH), nn.GELU(), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, DIM))
        optim = OptimConfig(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01, eps=1e-8, warmup_steps=2,
                            schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0)
        total = args.resume_at + args.after
        engine.setup(model, model.parameters(), optim, max_steps=total, micro_batch_size=micro, grad_accum_steps=1)
        engine.init_ema(0.9)
        step, losses = 0, {}
        if args.resume_from:
            step = load_checkpoint(engine, args.resume_from)["step"]
            engine.save(run_dir / "reloaded", {"step": step})
        while step < total:
            g = torch.Generator().manual_seed(1000 + step)  # the global batch of this update, on every rank
            x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
            y = torch.sin(3 * x).roll(1, dims=1)
            lo = engine.rank * micro
            loss = F.mse_loss(engine.forward(x[lo:lo + micro].to(engine.dtype)).float(), y[lo:lo + micro])
            engine.backward(loss)
            engine.step()
            engine.ema.update()
            step += 1
            losses[step] = engine.all_reduce_mean(loss.detach()).item()
            if step == args.resume_at and not args.resume_from:
                save_checkpoint(engine, run_dir, step, client_state={"step": step}, recipe_yaml="", keep=1, ema=True)
        if engine.is_main:
            (run_dir / "losses.json").write_text(json.dumps(losses))
        engine.shutdown()

    run_guarded(main)


@dataclass
class Row:
    """One case of the matrix in one precision."""

    case: str
    precision: str
    loss_rel: float
    """Against the uninterrupted run of the target layout."""
    loss_rel_src: float
    """Against the uninterrupted run of the source layout."""
    layouts_rel: float
    """Between the two uninterrupted runs, over the same updates."""
    moments: float
    reset: bool


def _launch(work: Path, name: str, layout: tuple[int, int], precision: str, args: argparse.Namespace,
            resume_from: Path | None = None) -> str:
    procs, stage = layout
    run_dir = work / name
    # One process needs no launcher (torchrun's own interpreter costs seconds of start-up).
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [sys.executable, *launcher,
           str(Path(__file__).resolve()), "--worker", "--run-dir", str(run_dir), "--zero-stage", str(stage),
           "--precision", precision, "--resume-at", str(args.resume_at), "--after", str(args.after)]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _moments_diff(saved: Path, reloaded: Path) -> float:
    from flowmatch.engine.elastic import read_full_state

    a, b = read_full_state(saved), read_full_state(reloaded)
    if a.keys() != b.keys():
        return float("inf")
    return max((a[n][k].double() - b[n][k].double()).abs().max().item() for n in a for k in a[n])


def _max_rel(got: dict, want: dict) -> float:
    return max(abs(got[k] - want[k]) / abs(want[k]) for k in got)


def run_matrix(args: argparse.Namespace, work: Path) -> list[Row]:
    rows: list[Row] = []
    fresh: dict[tuple[str, tuple[int, int]], dict] = {}  # the uninterrupted runs, each launched once

    def uninterrupted(precision: str, layout: tuple[int, int]) -> dict:
        if (precision, layout) not in fresh:
            name = f"{precision}-{layout[0]}z{layout[1]}"
            _launch(work, name, layout, precision, args)
            fresh[precision, layout] = json.loads((work / name / "losses.json").read_text())
        return fresh[precision, layout]

    for precision in args.precisions.split(","):
        for case in args.cases.split(","):
            src, dst = CASES[case]
            source = uninterrupted(precision, src)
            target = uninterrupted(precision, dst)
            ckpt = work / f"{precision}-{src[0]}z{src[1]}" / "checkpoints" / str(args.resume_at)
            name = f"{precision}-{case}"
            log = _launch(work, name, dst, precision, args, resume_from=ckpt)
            resumed = json.loads((work / name / "losses.json").read_text())
            rows.append(Row(case, precision, _max_rel(resumed, target), _max_rel(resumed, source),
                            _max_rel({k: source[k] for k in resumed}, target),
                            _moments_diff(ckpt / "state", work / name / "reloaded"),
                            "reset" in log or "restart from zero" in log))
    return rows


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [f"resume after {args.resume_at} updates, {args.after} compared after it",
             f"{'case':<10} {'precision':<9} {'vs dst':>9} {'vs src':>9} {'src~dst':>9} {'moments':>9}  reset"]
    for r in rows:
        src, dst = CASES[r.case]
        label = f"{src[0]}xZ{src[1]}->{dst[0]}xZ{dst[1]}"
        lines.append(f"{label:<10} {r.precision:<9} {r.loss_rel:>9.2e} {r.loss_rel_src:>9.2e} {r.layouts_rel:>9.2e} "
                     f"{r.moments:>9.2e}  {r.reset}")
    return "\n".join(lines)


def time_cache_builds(args: argparse.Namespace, work: Path) -> str:
    """Wall time of a cache build by 1 process and by `--cache-ranks` ranks, and whether the caches are equal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    encode = ["-m", "data_tools.cli", "encode", args.cache, "", "--recipe", args.recipe, "--no-progress"]
    seconds = {}
    for ranks in (1, args.cache_ranks):
        out = work / f"cache-{ranks}"
        encode[4] = str(out)
        launcher = ([sys.executable] if ranks == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)])
        start = time.perf_counter()
        subprocess.run([*launcher, *encode], env=env, check=True, capture_output=True, timeout=1800)
        seconds[ranks] = time.perf_counter() - start
    one, many = work / "cache-1", work / f"cache-{args.cache_ranks}"
    names = sorted(p.name for p in one.iterdir())
    same = names == sorted(p.name for p in many.iterdir()) and all(
        (one / n).read_bytes() == (many / n).read_bytes() for n in names)
    return (f"cache build of {args.cache}: 1 process {seconds[1]:.1f} s, {args.cache_ranks} ranks "
            f"{seconds[args.cache_ranks]:.1f} s (ratio {seconds[args.cache_ranks] / seconds[1]:.2f}); "
            f"{len(names)} files, byte-identical: {same}")


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    if args.cache:
        with tempfile.TemporaryDirectory(prefix="elastic-cache-") as tmp:
            print(time_cache_builds(args, Path(args.work_dir) if args.work_dir else Path(tmp)))
        return []
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_matrix(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="elastic-") as tmp:
            rows = run_matrix(args, Path(tmp))
    print(format_table(rows, args))
    return rows


if __name__ == "__main__":
    main()
