"""Loader throughput against the trainer it feeds: samples/s per worker for raw and cached shards, and the ratio
to the samples/s one rank's training step consumes (ratio > 1: the loader keeps ahead; the trainer never waits).

Raw shards are the recipe's own (built with its data.prepare builder into a temporary folder when missing);
cached shards are synthetic features with the shapes that recipe's encoders would write (identity autoencoder:
the image itself; MiniLM-style text: `--tokens` x `--hidden-dim`). The trainer's rate is measured here (MMDiT
forward + backward + AdamW on random inputs of the recipe's shapes and per-rank batch) or given as --step-rate.
`--scale sd3` swaps in SD3-sized synthetic data (`--image-side` px JPEGs cropped to 256, 16x32x32 latents,
77 x 4096 T5 states) to show the per-worker cost of a large job; give that job's --step-rate and --batch-size.
`--http` measures each shard set a second time, served by a local HTTP server (data_tools.serve) on 127.0.0.1.

`--resume` measures instead what resuming costs: the time to the first batch after `load_state_dict` at 10%, 50%
and 90% of an epoch of `--shards` shards of 64x64 JPEGs, against a fresh start (median of `--repeats`), and the
size of the saved state per stream.

    python benchmarks/loader.py                                   # digits recipe, CPU
    python benchmarks/loader.py --scale sd3 --step-rate 2.5 --batch-size 32 --workers 2 --image-side 256 --http
    python benchmarks/loader.py --resume --shards 120
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.serve import ShardServer
from flowmatch.data import DataConfig, build_loader, ensure_shards, expand_shards, features
from flowmatch.data.shardformat import ShardSink

FAKE_ENCODERS = {"text_encoder": "benchmark", "autoencoder": "benchmark"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/digits.yaml")
    p.add_argument("--scale", choices=("recipe", "sd3"), default="recipe")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: the recipe's)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--step-rate", type=float, default=None, help="trainer steps/s (default: measure the recipe's)")
    p.add_argument("--device", default="cpu", help="device for measuring the trainer step")
    p.add_argument("--samples", type=int, default=2048, help="synthetic samples written per shard set")
    p.add_argument("--tokens", type=int, default=12, help="caption tokens of the synthetic cached features")
    p.add_argument("--hidden-dim", type=int, default=384, help="text hidden width (MiniLM: 384; T5-XXL: 4096)")
    p.add_argument("--image-side", type=int, default=512, help="side of the synthetic JPEGs of --scale sd3")
    p.add_argument("--http", action="store_true", help="also measure the shards served over local HTTP")
    p.add_argument("--resume", action="store_true", help="measure the cost of resuming instead")
    p.add_argument("--shards", type=int, default=120, help="--resume: shards in the epoch")
    p.add_argument("--per-shard", type=int, default=100, help="--resume: samples per shard")
    p.add_argument("--buffer", type=int, default=1000, help="--resume: shuffle buffer")
    p.add_argument("--repeats", type=int, default=5, help="--resume: timings per position (median)")
    args = p.parse_args()
    if args.scale == "sd3" and args.step_rate is None and not args.resume:
        p.error("--scale sd3 needs the --step-rate of the job it would feed (its model is not built here)")
    return args


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A photo-like test image: smooth gradients plus noise (compresses like a photo, unlike pure noise)."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 12, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_raw(out: Path, count: int, side: int, shard_size: int = 0) -> None:
    rng = np.random.default_rng(0)
    with ShardSink(out, prefix="train", shard_size=shard_size or max(1, count // 8)) as sink:
        images = [jpeg(rng, side) for _ in range(16)]  # reuse a few encodings: writing is not what is measured
        for i in range(count):
            sink.write(f"s{i:06d}", {"jpg": images[i % 16], "txt": f"a synthetic photo number {i}"})


def write_cached(out: Path, count: int, latent_shape: tuple[int, ...], tokens: int, hidden: int, pooled: int) -> None:
    gen = torch.Generator().manual_seed(0)
    blob = features.encode(torch.randn(*latent_shape, generator=gen), torch.randn(tokens, hidden, generator=gen),
                           torch.randn(pooled, generator=gen), dtype="bf16", encoders=FAKE_ENCODERS)
    with ShardSink(out, prefix="train", shard_size=max(1, count // 8)) as sink:
        for i in range(count):
            sink.write(f"s{i:06d}", {features.EXT: blob, "txt": f"caption {i}"})


def loader_rate(cfg: DataConfig, batch_size: int, batches: int) -> float:
    """Samples/s handed out after the first batch (worker start-up excluded)."""
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=batch_size, seed=0)
    it = iter(loader)
    next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(it))
    return samples / (time.perf_counter() - start)


def trainer_step_rate(recipe_path: str, batch_size: int, device: str, steps: int = 10) -> float:
    """Steps/s of MMDiT forward + backward + AdamW at the recipe's shapes (what the loader has to keep up with)."""
    from flowmatch.config import load_recipe
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.models.mmdit import MMDiT

    recipe = load_recipe(recipe_path)
    encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels)
    model = MMDiT(encoders.fill_model_config(recipe.model)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    h, w = recipe.data.size
    f = encoders.downsample
    x = torch.randn(batch_size, encoders.latent_channels, h // f, w // f, device=device)
    cond = encoders.encode_text(["a handwritten digit seven"] * batch_size).to(device)

    def step() -> None:
        t = torch.rand(batch_size, device=device)
        loss = (model(x, t, cond) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def first_batch_seconds(cfg: DataConfig, batch_size: int, state: dict | None) -> float:
    """Seconds from building a loader (and loading `state`) to holding its first batch."""
    start = time.perf_counter()
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=batch_size, seed=0)
    if state is not None:
        loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start


def resume_cost(args: argparse.Namespace, tmp: Path) -> None:
    """Time to the first batch after resuming at 10/50/90% of an epoch, against a fresh start."""
    write_raw(tmp / "resume", args.shards * args.per_shard, 64, shard_size=args.per_shard)
    batch = args.batch_size or 32
    cfg = DataConfig(shards=str(tmp / "resume"), prepare="", resolution=64, channels=3, num_workers=0,
                     shuffle_buffer=args.buffer)
    per_epoch = args.shards * args.per_shard // batch
    fresh = statistics.median(first_batch_seconds(cfg, batch, None) for _ in range(args.repeats))
    print(f"{args.shards} shards x {args.per_shard} 64x64 JPEGs, batch {batch}, shuffle buffer {args.buffer}, "
          f"in-process loader; fresh start: {fresh * 1000:.1f} ms to the first batch")
    results = {"fresh_s": fresh, "positions": {}}
    for fraction in (0.1, 0.5, 0.9):
        loader = build_loader(cfg, rank=0, world_size=1, batch_size=batch, seed=0)
        it = iter(loader)
        for _ in range(round(per_epoch * fraction)):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        size = len(json.dumps(state["streams"]["0"]))
        seconds = statistics.median(first_batch_seconds(cfg, batch, state) for _ in range(args.repeats))
        results["positions"][fraction] = {"resume_s": seconds, "ratio": seconds / fresh, "state_bytes": size}
        print(f"resume at {fraction:.0%} of the epoch: {seconds * 1000:.1f} ms = {seconds / fresh:.2f}x a fresh "
              f"start; state {size / 1024:.1f} KiB per stream (JSON)")
    print(json.dumps(results, indent=1))


def main() -> None:
    args = parse_args()
    from flowmatch.config import load_recipe

    tmp = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        if args.resume:
            resume_cost(args, tmp)
        else:
            run(args, load_recipe(args.recipe), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, recipe, tmp: Path) -> None:
    batch = args.batch_size or recipe.train.batch_size
    workers = recipe.data.num_workers if args.workers is None else args.workers
    if args.scale == "sd3":
        raw_cfg = DataConfig(shards=str(tmp / "raw"), prepare="", resolution=256, channels=3)
        write_raw(tmp / "raw", args.samples, args.image_side)
        latent_shape, tokens, hidden, pooled = (16, 32, 32), 77, 4096, 2048
        raw_label = f"raw {args.image_side}px JPEG -> 256x256 RGB"
    else:
        raw_cfg = recipe.data
        if not expand_shards(raw_cfg.shards):
            raw_cfg = replace(raw_cfg, shards=str(tmp / "raw"))
        ensure_shards(raw_cfg)
        h, w = raw_cfg.size
        latent_shape, tokens, hidden, pooled = (raw_cfg.channels, h, w), args.tokens, args.hidden_dim, args.hidden_dim
        raw_label = f"raw {raw_cfg.shards} ({h}x{w}x{raw_cfg.channels})"
    write_cached(tmp / "cached", args.samples, latent_shape, tokens, hidden, pooled)
    cached_cfg = replace(raw_cfg, shards=str(tmp / "cached"), prepare="", cached=True)
    cached_label = f"cached latents {list(latent_shape)} + text {tokens}x{hidden} bf16"

    if args.step_rate is not None:
        step_rate, how = args.step_rate, "given"
    else:
        step_rate, how = trainer_step_rate(args.recipe, batch, args.device), f"measured on {args.device}"
    need = step_rate * batch
    print(f"trainer: {step_rate:.2f} steps/s x batch {batch} = {need:.0f} samples/s per rank ({how})")
    results = {}
    with ShardServer(tmp) if args.http else contextlib.nullcontext() as server:
        sets = [(raw_label, raw_cfg), (cached_label, cached_cfg)]
        if server is not None:
            sets += [(f"{label} over local HTTP", replace(cfg, shards=http_shards(server, tmp, cfg.shards)))
                     for label, cfg in sets]
        for label, cfg in sets:
            one = loader_rate(replace(cfg, num_workers=0), batch, args.batches)
            many = loader_rate(replace(cfg, num_workers=workers), batch, args.batches) if workers > 0 else one
            per_worker = many / max(1, workers)
            results[label] = {"in_process": one, "workers": workers, "total": many, "per_worker": per_worker,
                              "ratio": many / need}
            print(f"{label}: {one:.0f} samples/s in-process (1 worker); {workers} workers: {many:.0f} samples/s "
                  f"({per_worker:.0f} per worker); loader / trainer = {many / need:.2f}")
    print(json.dumps({"trainer_samples_per_s": need, "loaders": results}, indent=1))


def http_shards(server: ShardServer, root: Path, shards: str) -> str:
    """The same shards as URLs of `server`, which serves `root` (shards from elsewhere are copied there first)."""
    urls = []
    for u in expand_shards(shards):
        path = Path(u).resolve()
        if root.resolve() not in path.parents:
            (root / "copied").mkdir(exist_ok=True)
            path = Path(shutil.copy(path, root / "copied" / path.name)).resolve()
        urls.append(server.url(str(path.relative_to(root.resolve()))))
    return "::".join(urls)


if __name__ == "__main__":
    main()
