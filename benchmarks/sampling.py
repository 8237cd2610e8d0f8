"""Sampling speed: flowmatch's ``Pipeline.generate`` against diffusers' own pipeline on the same folder.

Both load one diffusers pipeline folder (an SD3 / SD3.5 folder, or one written by ``flowmatch export``) and
generate the same prompts from the same starting latents, at each step count, with classifier-free guidance (one
batched forward of cond + uncond per step on both sides). Batches alternate which library goes first, so a busy
machine slows both alike, and the whole set of batches is run ``--repeats`` times. Printed per step count: the
median over repeats of images/s of each and of their ratio (flowmatch / diffusers, higher is better; the range
over repeats beside it), and the components of each per image: the text encoding and the VAE decoding (timed
separately on the same batches) and the transformer steps (the rest of the time).

Time is the process's CPU time on CPU (``time.process_time``: what a shared, loaded machine does not inflate, as
it does wall time; with ``--threads 1`` it is the work of one core) and wall time between synchronisations on
CUDA; ``--clock wall`` takes wall time on CPU too.

Text features are encoded once per call and reused by every step; the conditional and unconditional passes run
as one batch; with fixed-length text (the pipelines' encoders) no attention mask reaches SDPA. ``--compile``
compiles the transformer's blocks for sampling too (inductor: minutes of compilation on CPU; the warm-up call
compiles, and each image size compiles once).

    python benchmarks/sampling.py --tiny        # the figure to quote on CPU: the tests' tiny random SD3 pipeline,
                                                # 32 prompts in batches of 8 at 8 and 28 steps, 1 thread, 3 repeats
    python benchmarks/sampling.py --pipeline PATH_OR_HUB_ID --steps 8,28 --prompts 64 --batch 8 --size 1024
    python benchmarks/sampling.py --pipeline PATH --steps 28 --compile    # ours with compiled blocks (one GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from flowmatch import Pipeline
from flowmatch.models.parallelize import apply_compile
from flowmatch.sampling.generate import image_noise

#: Captions of several lengths and subjects, cycled to the requested number of prompts.
PROMPTS = ["a photo of a cat", "a red apple on a wooden table", "a city street at night",
           "a painting of a dog on a table", "the red cat", "a photo of the city at night on a wooden street"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="a diffusers StableDiffusion3Pipeline folder or hub id")
    source.add_argument("--tiny", action="store_true", help="build the tests' tiny random SD3 pipeline")
    parser.add_argument("--steps", default="8,28", help="Euler step counts, comma-separated")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--repeats", type=int, default=3, help="runs over all batches; medians are reported")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="auto: the process's CPU time on CPU, wall time on CUDA")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: 1024, tiny 32)")
    parser.add_argument("--guidance", type=float, default=7.0, help="SD3's default guidance scale")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="weights and compute dtype of both (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --tiny, else torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile flowmatch's transformer blocks")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is None and args.tiny:
        args.threads = 1
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_of(name: str, device: torch.device) -> Callable[[], float]:
    """The clock ``--clock name`` means on ``device``: CPU time of this process, or wall time."""
    cpu = name == "cpu" or (name == "auto" and device.type == "cpu")
    return time.process_time if cpu else time.perf_counter


def timed(device: torch.device, fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def measure(batches: list[list[str]], batch_size: int, shape: tuple[int, int, int], steps: int, repeats: int,
            images: int, part_s: dict[str, float], runs: dict[str, Callable], time_of: Callable) -> dict:
    """Every batch through both libraries ``repeats`` times, alternating which goes first; medians over repeats."""
    per_repeat: list[dict[str, float]] = []
    paired: list[float] = []
    for _ in range(repeats):
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for i, batch in enumerate(batches):
            noise = image_noise(list(range(i * batch_size, i * batch_size + len(batch))), shape)
            order = list(runs.items())
            for name, run in order if i % 2 == 0 else order[::-1]:
                seconds[name].append(time_of(partial(run, batch, noise, steps)))
        per_repeat.append({name: sum(s) for name, s in seconds.items()})
        paired += [d / o for o, d in zip(seconds["ours"], seconds["diffusers"])]
    ratios = [r["diffusers"] / r["ours"] for r in per_repeat]
    total = {name: statistics.median(r[name] for r in per_repeat) for name in runs}
    # Per image: the transformer steps are what encoding and decoding leave of the total.
    per_image = {name: {"total": total[name] / images, "encode": part_s[f"{name} encode"] / images,
                        "decode": part_s[f"{name} decode"] / images} for name in runs}
    for p in per_image.values():
        p["steps"] = p["total"] - p["encode"] - p["decode"]
    return {**{name: images / total[name] for name in runs}, "ratio": statistics.median(ratios), "ratios": ratios,
            "seconds": per_repeat,
            "paired": statistics.median(paired), "components": per_image}


def report(steps: int, r: dict) -> None:
    print(f"{steps:>3} steps: flowmatch {r['ours']:8.2f} images/s, diffusers {r['diffusers']:8.2f} images/s; "
          f"flowmatch / diffusers {r['ratio']:.3f} (median of {len(r['ratios'])} repeats, range "
          f"{min(r['ratios']):.3f}-{max(r['ratios']):.3f}; median of paired batches {r['paired']:.3f})", flush=True)
    print("      per image, flowmatch / diffusers: " + "; ".join(
        f"{part} {r['components']['ours'][key] * 1e3:.1f} / {r['components']['diffusers'][key] * 1e3:.1f} ms"
        for part, key in (("text encoding", "encode"), ("transformer steps", "steps"), ("VAE decoding", "decode"))),
        flush=True)


def tiny_pipeline_folder(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' offline builder, in this checkout
    from tests.tiny_pipelines import save_sd3_pipeline

    return save_sd3_pipeline(root / "tiny-sd3")


def main(argv: Optional[Sequence[str]] = None) -> dict[int, dict[str, float]]:
    args = parse_args(argv)
    from diffusers import StableDiffusion3Pipeline

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_pipeline_folder(Path(tmp)) if args.tiny else args.pipeline
        size = args.size or (32 if args.tiny else 1024)
        ours = Pipeline.from_diffusers(folder, device=device, dtype=dtype_name)
        if args.compile:
            apply_compile(ours.model)
        theirs = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype).to(device)
        theirs.set_progress_bar_config(disable=True)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
        batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
        c, h, w = ours.latent_shape(size, size)
        print(f"{folder}: {len(prompts)} prompts in batches of {args.batch}, {size}x{size} pixels, guidance "
              f"{args.guidance:g}, {device} {dtype_name}, torch threads {torch.get_num_threads()}, compile "
              f"{args.compile}, {args.repeats} repeats, "
              f"{'CPU' if clock_of(args.clock, device) is time.process_time else 'wall'} time")

        def run_ours(batch: list[str], noise: torch.Tensor, steps: int) -> None:
            ours.generate(batch, steps=steps, guidance_scale=args.guidance, noise=noise)

        def run_theirs(batch: list[str], noise: torch.Tensor, steps: int) -> None:
            theirs(prompt=batch, num_inference_steps=steps, guidance_scale=args.guidance, height=size, width=size,
                   latents=noise.to(device, dtype), output_type="pt")

        # Text encoding and decoding, each library's own, on the same batches.
        latents = torch.randn(args.batch, c, h, w, device=device, dtype=dtype)
        parts = {
            "ours encode": lambda b: ours.encoders.encode_text(b),
            "diffusers encode": lambda b: theirs.encode_prompt(b, b, b, do_classifier_free_guidance=True,
                                                               device=device),
            "ours decode": lambda b: ours.encoders.decode(latents[:len(b)].float()),
            "diffusers decode": lambda b: theirs.vae.decode(
                latents[:len(b)] / theirs.vae.config.scaling_factor + theirs.vae.config.shift_factor),
        }
        clock = clock_of(args.clock, device)
        with torch.inference_mode():
            warm_noise = image_noise(list(range(len(batches[0]))), (c, h, w))
            warm_up = timed(device, partial(run_ours, batches[0], warm_noise, 1), clock)  # loading, allocator, compile
            print(f"flowmatch's warm-up call (compiles with --compile; inductor's compile workers and cache hits are "
                  f"not in this process's CPU time): {warm_up:.1f} s", flush=True)
            run_theirs(batches[0], image_noise(list(range(len(batches[0]))), (c, h, w)), 1)
            part_s = {name: statistics.median(sum(timed(device, partial(fn, b), clock) for b in batches)
                                              for _ in range(args.repeats))
                      for name, fn in parts.items()}
            results: dict[int, dict[str, float]] = {}
            for steps in args.steps:
                runs = {"ours": run_ours, "diffusers": run_theirs}
                results[steps] = measure(batches, args.batch, (c, h, w), steps, args.repeats, len(prompts), part_s,
                                         runs, partial(timed, device, clock=clock))
                report(steps, results[steps])
    return results


if __name__ == "__main__":
    main()
