"""Loader throughput against the trainer it feeds: samples/s per worker for raw and cached shards, and the ratio
to the samples/s one rank's training step consumes (ratio > 1: the loader keeps ahead; the trainer never waits).

Raw shards are the recipe's own (built with its data.prepare builder into a temporary folder when missing);
cached shards are synthetic features with the shapes that recipe's encoders would write (identity autoencoder:
the image itself; MiniLM-style text: `--tokens` x `--hidden-dim`). The trainer's rate is measured here (MMDiT
forward + backward + AdamW on random inputs of the recipe's shapes and per-rank batch) or given as --step-rate.
`--scale sd3` swaps in SD3-sized synthetic data (512px JPEGs cropped to 256, 16x32x32 latents, 77 x 4096 T5
states) to show the per-worker cost of a large job; give that job's --step-rate and --batch-size.

    python benchmarks/loader.py                                   # digits recipe, CPU
    python benchmarks/loader.py --scale sd3 --step-rate 2.5 --batch-size 32 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    args = p.parse_args()
    if args.scale == "sd3" and args.step_rate is None:
        p.error("--scale sd3 needs the --step-rate of the job it would feed (its model is not built here)")
    return args


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A photo-like test image: smooth gradients plus noise (compresses like a photo, unlike pure noise)."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 12, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_raw(out: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    with ShardSink(out, prefix="train", shard_size=max(1, count // 8)) as sink:
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
    from flowmatch.models.mmdit import MMDiT
    from flowmatch.encoders.frozen import FrozenEncoders

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


def main() -> None:
    args = parse_args()
    from flowmatch.config import load_recipe

    recipe = load_recipe(args.recipe)
    tmp = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        run(args, recipe, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, recipe, tmp: Path) -> None:
    batch = args.batch_size or recipe.train.batch_size
    workers = recipe.data.num_workers if args.workers is None else args.workers
    if args.scale == "sd3":
        raw_cfg = DataConfig(shards=str(tmp / "raw"), prepare="", resolution=256, channels=3)
        write_raw(tmp / "raw", args.samples, 512)
        latent_shape, tokens, hidden, pooled = (16, 32, 32), 77, 4096, 2048
        raw_label = "raw 512px JPEG -> 256x256 RGB"
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
    for label, cfg in ((raw_label, raw_cfg), (cached_label, cached_cfg)):
        one = loader_rate(replace(cfg, num_workers=0), batch, args.batches)
        many = loader_rate(replace(cfg, num_workers=workers), batch, args.batches) if workers > 0 else one
        per_worker = many / max(1, workers)
        results[label] = {"in_process": one, "workers": workers, "total": many, "per_worker": per_worker,
                          "ratio": many / need}
        print(f"{label}: {one:.0f} samples/s in-process (1 worker); {workers} workers: {many:.0f} samples/s "
              f"({per_worker:.0f} per worker); loader / trainer = {many / need:.2f}")
    print(json.dumps({"trainer_samples_per_s": need, "loaders": results}, indent=1))


if __name__ == "__main__":
    main()
