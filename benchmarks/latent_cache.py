"""Training on cached features against training on raw shards: samples/s and the trainer process's peak memory.

Each mode runs the recipe's real trainer step (Trainer.micro_loss, engine backward and step) in its own process,
built by `assemble` exactly as `flowmatch train` builds it: `cached` reads `data.cache` (encoded first when
missing; the text encoder and the autoencoder's encoder half are then freed), `uncached` sets `data.cache=''` and
encodes every batch in the trainer. Reported per mode: samples/s over the timed steps (after warm-up steps),
the peak resident memory of the trainer process over the whole run (VmHWM: includes loading the encoders) and
during the timed steps alone (the high-water mark is reset after warm-up through /proc/self/clear_refs; Linux).
DataLoader worker processes are not included in either.

    python benchmarks/latent_cache.py                      # recipes/digits-latent.yaml, 30 timed steps
    python benchmarks/latent_cache.py --steps 60 --set train.batch_size=64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("cached", "uncached")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/digits-latent.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for both modes (repeatable)")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)  # one mode, in this process
    return p.parse_args(argv)


def status_kib(field: str) -> int:
    """A /proc/self/status memory line in KiB (e.g. VmHWM, the peak resident set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(args: argparse.Namespace) -> dict:
    """Run one mode in this process and return its figures."""
    from flowmatch.config import load_recipe
    from flowmatch.training.assembly import assemble
    from flowmatch.training.loop import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*args.overrides, f"run_dir={run_dir}", "logging.tensorboard=false", "logging.progress=false"]
        if args.mode == "uncached":
            overrides.append("data.cache=")
        recipe = load_recipe(args.recipe, overrides)
        run = assemble(recipe)
        trainer = Trainer(run)
        batches = iter(run.loader)
        e = run.engine
        e.train()

        def step() -> None:
            for generator in run.generators:
                e.backward(trainer.micro_loss(next(batches), generator).loss)
            e.step()

        for _ in range(args.warmup):
            step()
        peak_with_loading = status_kib("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - started
        batches.close()
        return {
            "mode": args.mode, "samples_per_s": args.steps * recipe.train.batch_size / seconds,
            "steps": args.steps, "batch_size": recipe.train.batch_size, "seconds": seconds,
            "peak_rss_mib": max(peak_with_loading, status_kib("VmHWM")) / 1024,
            "peak_rss_training_mib": status_kib("VmHWM") / 1024,
            "encoders_freed": run.encoders.released,
        }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)), flush=True)
        return 0
    rows = []
    for mode in MODES:  # cached first: it builds whatever is missing (shards, autoencoder, cache)
        cmd = [sys.executable, __file__, "--mode", mode, "--recipe", args.recipe, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *[f"--set={o}" for o in args.overrides]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"the {mode} run failed (exit status {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'mode':>9} {'samples/s':>10} {'peak RSS MiB':>13} {'during steps':>13} {'encoders freed':>15}")
    for r in rows:
        print(f"{r['mode']:>9} {r['samples_per_s']:>10.1f} {r['peak_rss_mib']:>13.0f} "
              f"{r['peak_rss_training_mib']:>13.0f} {str(r['encoders_freed']):>15}")
    print(f"cached / uncached throughput: {rows[0]['samples_per_s'] / rows[1]['samples_per_s']:.2f}x "
          f"({rows[0]['steps']} steps of {rows[0]['batch_size']} after {args.warmup} warm-up steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
