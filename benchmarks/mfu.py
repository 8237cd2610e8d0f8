"""Training speed of an MMDiT preset through the training engine: step time, TFLOP/s, MFU, peak memory, breakdown.

Each step is what ``flowmatch train`` runs on the model: the engine's forward (DeepSpeed-wrapped, in the recipe
precision), an MSE loss, the engine's backward and step (AdamW, ZeRO stage of ``--zero``). Inputs are random
latents of ``--tokens`` image tokens and ``--text-len`` text tokens. Reported per image-token count:

- step time (median), split into forward, backward and optimizer (each timed between device synchronisations);
- achieved TFLOP/s (flowmatch.models.flops estimate) and MFU against the device's dense bf16 peak from the table
  below (its source named) and against this machine's measured matmul peak in the benchmark dtype;
- peak memory (CUDA allocator; on CPU the process's maximum resident size);
- with ``--profile``, the busiest operators of one step from ``torch.profiler``.

    python benchmarks/mfu.py --preset sd3-medium --tokens 256,1024 --dtype bf16 --compile      # one GPU
    torchrun --nproc-per-node 8 benchmarks/mfu.py --preset sd3-medium --tokens 1024 --dtype bf16 --zero 2
    python benchmarks/mfu.py --preset tiny --tokens 16 --device cpu --dtype fp32 --steps 2     # the CPU smoke path

Under torchrun every rank trains its own ``--batch`` (data parallel); MFU is per device.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from flowmatch.conditioning import Conditioning
from flowmatch.dtypes import DTYPES
from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.families.presets import config_from_preset
from flowmatch.models import MMDiT
from flowmatch.models.flops import mfu, training_flops_per_step
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile

# Dense (no sparsity) bf16 tensor-core peaks, matched by a substring of torch.cuda.get_device_name(); the first
# match wins, so the PCIe H100 comes before the SXM one.
PEAKS: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet, PCIe: 756 TFLOPS bf16 dense (1,513 with sparsity)"),
    ("H100", 989e12, "NVIDIA H100 datasheet, SXM: 989 TFLOPS bf16 dense (1,979 with sparsity)"),
    ("H200", 989e12, "NVIDIA H200 datasheet, SXM: 989 TFLOPS bf16 dense (1,979 with sparsity)"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)"),
    ("L40S", 362e12, "NVIDIA L40S datasheet: 362 TFLOPS bf16 dense (733 with sparsity)"),
    ("A10G", 70e12, "NVIDIA A10G (AWS) : 70 TFLOPS bf16 dense"),
]
# SD3's pipelines give the MMDiT 77 CLIP tokens followed by 256 T5 tokens (max_sequence_length 256).
SD3_TEXT_TOKENS = 77 + 256
# Encoder-dependent sizes the test-sized presets leave open: SD3's (16-channel VAE, T5-XXL, CLIP-L + CLIP-G).
OPEN_SIZES = dict(in_channels=16, context_dim=4096, pooled_dim=2048)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd3-medium", help="an MMDiT preset (flowmatch.families.presets)")
    parser.add_argument("--tokens", default="256,1024", help="image tokens per sample, comma-separated squares")
    parser.add_argument("--text-len", type=int, default=SD3_TEXT_TOKENS, help="text tokens per sample")
    parser.add_argument("--batch", type=int, default=8, help="samples per device and step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the engine's precision")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block, as model.compile does")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each block")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per token count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's busiest operators")
    parser.add_argument("--peak-size", type=int, default=4096, help="side of the square matmul timed for the peak")
    args = parser.parse_args(argv)
    args.tokens = [int(n) for n in args.tokens.split(",")]
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            parser.error(f"--tokens must be square numbers (a square latent grid), got {n}")
    return args


@dataclass
class Measurement:
    """Medians over the timed steps of one image-token count, in seconds, and the peak memory in bytes."""

    tokens: int
    step: float
    forward: float
    backward: float
    optimizer: float
    flops: float
    peak_memory: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_peak(device: torch.device) -> Optional[tuple[float, str]]:
    """(dense bf16 FLOP/s, source) of this CUDA device from :data:`PEAKS`, or None when unknown or not CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((flops, source) for key, flops, source in PEAKS if key in name), None)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best observed FLOP/s of an n x n x n matmul in ``dtype`` on ``device``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def training_step(engine: Engine, model: MMDiT, tokens: int, args: argparse.Namespace
                  ) -> Callable[[], tuple[float, float, float]]:
    """One training step on fixed random inputs of ``tokens`` image tokens; returns its (forward, backward,
    optimizer) seconds, each timed between device synchronisations."""
    cfg, device, dtype = model.cfg, engine.device, engine.dtype
    side = math.isqrt(tokens) * cfg.patch_size
    g = torch.Generator().manual_seed(engine.rank)
    b = args.batch
    x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device, dtype)
    target = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device)
    t = torch.rand(b, generator=g).to(device, dtype)
    cond = Conditioning(torch.randn(b, args.text_len, cfg.context_dim, generator=g),
                        torch.ones(b, args.text_len, dtype=torch.bool),
                        torch.randn(b, cfg.pooled_dim, generator=g)).to(device, dtype)

    def timed(fn: Callable[[], object]) -> tuple[object, float]:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - start

    def step() -> tuple[float, float, float]:
        loss, fwd = timed(lambda: F.mse_loss(engine.forward(x, t, cond).float(), target))
        _, bwd = timed(lambda: engine.backward(loss))
        _, opt = timed(engine.step)
        return fwd, bwd, opt

    return step


def measure(engine: Engine, model: MMDiT, tokens: int, args: argparse.Namespace) -> Measurement:
    """Train ``args.warmup + args.steps`` steps of ``tokens`` image tokens; medians of the timed ones."""
    device = engine.device
    step = training_step(engine, model, tokens, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases: list[tuple[float, float, float]] = []
    for i in range(args.warmup + args.steps):
        seconds = step()
        if i >= args.warmup:
            phases.append(seconds)
    fwd, bwd, opt = (statistics.median(p) for p in zip(*phases))
    side = math.isqrt(tokens) * model.cfg.patch_size
    with torch.device("meta"):  # sized on a copy: under ZeRO-3 the engine's model is partitioned
        shape_model = MMDiT(model.cfg)
    flops = training_flops_per_step(shape_model, batch_size=args.batch, latent_size=(side, side),
                                    text_len=args.text_len).total
    return Measurement(tokens, statistics.median(sum(p) for p in phases), fwd, bwd, opt, flops=flops,
                       peak_memory=peak_memory(device))


def build_model(args: argparse.Namespace, engine: Engine) -> MMDiT:
    open_sizes = {k: v for k, v in OPEN_SIZES.items() if config_from_preset(args.preset).__dict__[k] is None}
    cfg = config_from_preset(args.preset, **open_sizes)
    with engine.model_init():
        model = MMDiT(cfg)
    with engine.gathered_params(model, modify=True):
        model.init_weights()
    if args.checkpointing:
        apply_activation_checkpointing(model)
    if args.compile:
        apply_compile(model)
    return model


def report(m: Measurement, peaks: list[tuple[str, float]]) -> str:
    tflops = m.flops / m.step / 1e12
    utilisation = ", ".join(f"MFU {mfu(m.flops, m.step, peak):.1%} of {name}" for name, peak in peaks)
    return (f"tokens {m.tokens:>5}: step {m.step * 1e3:9.1f} ms (forward {m.forward * 1e3:.1f}, backward "
            f"{m.backward * 1e3:.1f}, optimizer {m.optimizer * 1e3:.1f}), {tflops:.3f} TFLOP/s per device, "
            f"{utilisation}; peak memory {m.peak_memory / 2**30:.2f} GiB")


def main(argv: Optional[Sequence[str]] = None) -> list[Measurement]:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dist = DistributedConfig(zero_stage=args.zero, precision=args.dtype,
                             backend="nccl" if args.device == "cuda" else "gloo")
    results = []
    with Engine(dist) as engine:
        model = build_model(args, engine)
        engine.setup(model, model.parameters(), OptimConfig(lr=1e-5, warmup_steps=0),
                     max_steps=len(args.tokens) * (args.warmup + args.steps) + 1, micro_batch_size=args.batch,
                     grad_accum_steps=1)
        device = engine.device
        peaks = []
        sheet = datasheet_peak(device)
        if sheet is not None and engine.dtype == torch.bfloat16:
            peaks.append((f"the datasheet peak ({sheet[1]})", sheet[0]))
        peaks.append((f"the measured {args.dtype} matmul peak", matmul_peak(device, engine.dtype, args.peak_size)))
        if engine.is_main:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            params = sum(p.numel() for p in model.parameters()) if args.zero < 3 else float("nan")
            print(f"{args.preset}: {params / 1e6:.1f}M parameters; {name} x {engine.world_size}, {args.dtype}, "
                  f"ZeRO-{args.zero}, compile {args.compile}, checkpointing {args.checkpointing}, batch "
                  f"{args.batch} per device, {args.text_len} text tokens, torch {torch.__version__}")
        for tokens in args.tokens:
            m = measure(engine, model, tokens, args)
            results.append(m)
            if engine.is_main:
                print(report(m, peaks), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            step = training_step(engine, model, args.tokens[-1], args)
            with profile(activities=activities) as prof:
                step()
            if engine.is_main:
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15))
    return results


if __name__ == "__main__":
    main()
