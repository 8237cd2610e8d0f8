"""Training-step speed of flowmatch's MMDiT against diffusers' SD3Transformer2DModel on identical weights and inputs.

One step = forward, MSE loss, backward, AdamW. Timings of the two models are interleaved (alternating which goes
first) in one run, so a shared or throttled machine slows both alike; the figure to read is the ratio of medians
(ours / diffusers, lower is better), by wall time and by this process's CPU time (the latter is less disturbed by
other processes on a shared machine), and of the fastest steps (the least disturbed ones: at 2 threads on a loaded
machine a step's parallel regions wait for descheduled threads, which costs more the more kernels a step launches).
Also reports the FLOP/s ours achieves (flowmatch.models.flops estimate) against this machine's measured matmul peak.

Each side steps with the AdamW its own library trains with: ours the implementation the engine picks
(flowmatch.engine.optim.adamw_implementation, fused), diffusers torch's default (the one its training examples
build). `--compile` then compiles every transformer block of both models in place (torch.compile, default mode:
ours through flowmatch.models.parallelize.apply_compile, as train.compile does; diffusers' blocks alike) and
times them again, printing an eager and a compiled column.

    python benchmarks/mmdit_step.py                       # CPU, fp32, the issue's small config
    python benchmarks/mmdit_step.py --threads 1 --compile
    python benchmarks/mmdit_step.py --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from flowmatch.conditioning import Conditioning
from flowmatch.engine.optim import adamw_implementation
from flowmatch.families.convert import from_diffusers
from flowmatch.models.flops import mfu, training_flops_per_step
from flowmatch.models.parallelize import apply_compile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="bf16 = autocast over fp32 weights, as in mixed-precision training")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--latent-channels", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--context-dim", type=int, default=4096, help="T5-XXL width, as SD3")
    parser.add_argument("--pooled-dim", type=int, default=2048, help="CLIP-L + CLIP-G pooled width, as SD3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed for the peak")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 is steadiest on a machine shared with other jobs")
    parser.add_argument("--compile", action="store_true",
                        help="then compile both models' blocks and time them again (a second column)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile (aot_eager traces without code generation: tests)")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulPeak:
    """Best observed FLOP/s of an n x n x n matmul, sampled between training steps so that it sees the same
    machine load as they do (on a shared machine a peak timed once can be far too low or too high)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int) -> None:
        self.device, self.n = device, n
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.best_s = float("inf")
        self.a @ self.b

    def sample(self, reps: int = 2) -> None:
        for _ in range(reps):
            sync(self.device)
            start = time.perf_counter()
            self.a @ self.b
            sync(self.device)
            self.best_s = min(self.best_s, time.perf_counter() - start)

    @property
    def flops(self) -> float:
        return 2 * self.n**3 / self.best_s


def make_step(
    forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, target, device, autocast_dtype
) -> Callable[[], tuple[float, float]]:
    """A training step returning (wall seconds, process CPU seconds)."""

    def step() -> tuple[float, float]:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu_start

    return step


def time_steps(steps: dict[str, Callable[[], tuple[float, float]]], peak: MatmulPeak, args: argparse.Namespace,
               warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each timed step, by model name."""
    # Each iteration times both models back to back, so each pair saw about the same machine load.
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + args.steps):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            wall, cpu = steps[name]()
            if i >= warmup:
                times[name].append(wall)
                cpu_times[name].append(cpu)
        peak.sample()
    return times, cpu_times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark; returns {"eager" (and "compiled"): {"ours", "diffusers" (median wall s), "ratio",
    "cpu_ratio", "fastest_ratio", "err"}}."""
    args = parse_args(argv)
    from diffusers import SD3Transformer2DModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(
        sample_size=args.latent_size, patch_size=2, in_channels=args.latent_channels, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=args.context_dim,
        caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=args.pooled_dim,
        out_channels=args.latent_channels, pos_embed_max_size=args.latent_size, qk_norm="rms_norm",
    )
    with torch.no_grad():  # perturb every weight so no output or gradient is trivially zero
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = from_diffusers(theirs).to(device).train()
    theirs = theirs.to(device).train()

    g = torch.Generator().manual_seed(1)
    b, c, s = args.batch, args.latent_channels, args.latent_size
    x = torch.randn(b, c, s, s, generator=g).to(device)
    t = torch.rand(b, generator=g).to(device)
    ctx = torch.randn(b, args.text_len, args.context_dim, generator=g).to(device)
    pooled = torch.randn(b, args.pooled_dim, generator=g).to(device)
    target = torch.randn(b, c, s, s, generator=g).to(device)
    # Every caption token real: diffusers' SD3 model takes no text mask, ours always applies one.
    cond = Conditioning(ctx, torch.ones(b, args.text_len, dtype=torch.bool, device=device), pooled)

    with torch.no_grad():
        ref = theirs(x, ctx, pooled, t * ours.cfg.time_scale).sample
        err = ((ours(x, t, cond) - ref).abs().max() / ref.abs().max()).item()

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **adamw_implementation(device))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    steps = {
        "ours": make_step(lambda: ours(x, t, cond), opt_ours, target, device, dtype),
        "diffusers": make_step(lambda: theirs(x, ctx, pooled, t * ours.cfg.time_scale).sample, opt_theirs,
                               target, device, dtype),
    }
    peak = MatmulPeak(device, dtype, args.peak_size)
    flops = training_flops_per_step(ours, batch_size=b, latent_size=(s, s), text_len=args.text_len).total
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"config: {args.layers} layers, {args.heads} heads x {args.head_dim}, latents {b}x{c}x{s}x{s}, "
          f"{args.text_len} text tokens (dim {args.context_dim}), {n_params / 1e6:.2f}M params")
    print(f"AdamW: ours {adamw_implementation(device) or 'default'}, diffusers torch's default")

    results: dict[str, dict[str, float]] = {}
    columns = ["eager", "compiled"] if args.compile else ["eager"]
    for column in columns:
        warmup = args.warmup
        if column == "compiled":
            apply_compile(ours, backend=args.compile_backend)
            for block in theirs.transformer_blocks:
                block.compile(backend=args.compile_backend)
            start = time.perf_counter()
            with torch.no_grad():
                ref = theirs(x, ctx, pooled, t * ours.cfg.time_scale).sample
                err = ((ours(x, t, cond) - ref).abs().max() / ref.abs().max()).item()
            for step in steps.values():  # compiles the backward graphs
                step()
            print(f"compilation (forward and backward of both): {time.perf_counter() - start:.1f} s")
        times, cpu_times = time_steps(steps, peak, args, warmup)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        cpu_med = {name: statistics.median(ts) for name, ts in cpu_times.items()}
        paired = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))
        results[column] = {**med, "ratio": med["ours"] / med["diffusers"],
                           "cpu_ratio": cpu_med["ours"] / cpu_med["diffusers"],
                           "fastest_ratio": min(times["ours"]) / min(times["diffusers"]), "err": err}
        print(f"--- {column}")
        print(f"output rel. max error vs diffusers (fp32 forward, before the timed steps): {err:.2e}")
        for name, ts in times.items():
            print(f"{name:>9}: median {med[name] * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f} ms  "
                  f"(process CPU time: median {cpu_med[name] * 1e3:8.1f} ms) over {len(ts)} steps")
        fastest = min(times["ours"]) / min(times["diffusers"])
        print(f"ratio ours/diffusers: median of paired step ratios {paired:.3f}; of median step times "
              f"{med['ours'] / med['diffusers']:.3f}; of median process CPU times "
              f"{cpu_med['ours'] / cpu_med['diffusers']:.3f}; of fastest steps {fastest:.3f}")
        for label, step_s in (("median", med["ours"]), ("fastest", min(times["ours"]))):
            print(f"ours achieved ({label} step): {flops / step_s / 1e9:.1f} GFLOP/s, "
                  f"fraction of peak (MFU) {mfu(flops, step_s, peak.flops):.1%}")
    print(f"estimated training FLOPs per step: {flops / 1e9:.1f} GFLOP; measured {args.dtype} matmul peak "
          f"({args.peak_size}^3, best of all samples): {peak.flops / 1e9:.1f} GFLOP/s")
    if args.compile:
        print("ratio ours/diffusers (median step times)   eager {:.3f}   compiled {:.3f}".format(
            results["eager"]["ratio"], results["compiled"]["ratio"]))
        print("ratio ours/diffusers (median CPU times)    eager {:.3f}   compiled {:.3f}".format(
            results["eager"]["cpu_ratio"], results["compiled"]["cpu_ratio"]))
        print("ratio ours/diffusers (fastest steps)       eager {:.3f}   compiled {:.3f}".format(
            results["eager"]["fastest_ratio"], results["compiled"]["fastest_ratio"]))
    return results


if __name__ == "__main__":
    main()
