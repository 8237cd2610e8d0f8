"""Training speed of every family's model through the training engine: step time, TFLOP/s, MFU, peak memory.

Each step is what ``flowmatch train`` runs on the model: the engine's forward (DeepSpeed-wrapped, in the recipe
precision), an MSE loss, the engine's backward and step (AdamW, ZeRO stage of ``--zero``), on every parameter or,
with ``--lora RANK``, on LoRA adapters of the frozen base. Inputs are random latents of ``--tokens`` image tokens
and the family's text length (its pipeline's: SD3 77 CLIP + 256 T5 tokens, FLUX 512 T5 tokens), none of them
padding, so no attention mask is passed (SDPA's flash kernels stay eligible). ``--preset`` names one preset of
each family (default: the released sizes, and the U-Net's only preset). Reported per preset and image-token count:

- the training FLOPs of one step as the family counts them (``Family.flops``) beside an independent count of one
  forward and backward on a meta-device copy under ``torch.utils.flop_counter.FlopCounterMode``, and their
  difference (within 2%; with ``--lora`` both count the frozen base, which computes no weight gradients, and the
  adapters: ``flowmatch.families.lora.training_flops``); the MFU divides the family's count;
- step time (median), split into forward, backward and optimizer (each timed between device synchronisations);
- achieved TFLOP/s and MFU against the device's dense bf16 peak from the table below (its source named) and
  against this machine's measured matmul peak in the benchmark dtype;
- peak memory (CUDA allocator; on CPU the process's maximum resident size);
- with ``--profile``, the busiest operators of one step from ``torch.profiler``.

    python benchmarks/mfu.py --tokens 256,1024 --dtype bf16 --compile                # every family, one GPU
    python benchmarks/mfu.py --tokens 256,1024 --dtype bf16 --compile --lora 16      # LoRA on each that has it
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flowmatch.conditioning import Conditioning
from flowmatch.dtypes import DTYPES
from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.families import FAMILIES, Family, family_of
from flowmatch.families.config import ModelConfig
from flowmatch.families.lora import apply_lora, training_flops
from flowmatch.families.presets import PRESET_FAMILY, preset_values
from flowmatch.models.flops import mfu
from flowmatch.models.lora import LoraConfig
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
#: CLIP's token length: SD3's pipeline puts 77 CLIP tokens before T5's (a family whose text layout has CLIP states).
CLIP_TOKENS = 77
#: The preset each family is measured at by default: its released size (the U-Net has only its digits size).
RELEASE_PRESETS = {"sd3": "sd3-medium", "flux": "flux-dev", "kontext": "flux-kontext-dev", "qwen_image": "qwen-image",
                   "qwen_image_edit": "qwen-image-edit", "chroma": "chroma", "zimage": "zimage",
                   "lumina2": "lumina2", "flux2": "flux2-klein-4b",
                   "unet": "digits-unet"}
#: Encoder-dependent sizes presets leave open: a 16-channel VAE, T5-XXL states, and the pooled CLIP width of the
#: family's pipeline (SD3: CLIP-L + CLIP-G projections; FLUX: CLIP-L's pooler output).
OPEN_SIZES = dict(in_channels=16, context_dim=4096)
POOLED_SIZES = {True: 768, False: 768 + 1280}  # by TextLayout.one_clip


def release_preset(family: Family) -> str:
    """The preset a family is measured at by default (a family missing from RELEASE_PRESETS: its first)."""
    return RELEASE_PRESETS.get(family.name) or next(iter(family.presets))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=",".join(release_preset(f) for f in FAMILIES.values()),
                        help="comma-separated presets of any families (flowmatch.families.presets)")
    parser.add_argument("--tokens", default="256,1024", help="image tokens per sample, comma-separated squares")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens per sample (default: the family's pipeline's)")
    parser.add_argument("--lora", type=int, default=0, help="train LoRA adapters of this rank on the frozen base "
                        "(families that have LoRA; 0 = full training)")
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
    args.preset = args.preset.split(",")
    unknown = [p for p in args.preset if p not in PRESET_FAMILY]
    if unknown:
        parser.error(f"--preset: unknown {unknown} (allowed: {', '.join(sorted(PRESET_FAMILY))})")
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            parser.error(f"--tokens must be square numbers (a square latent grid), got {n}")
    return args


@dataclass
class Measurement:
    """Medians over the timed steps of one preset and image-token count, in seconds, FLOPs of one step and the
    peak memory in bytes."""

    preset: str
    tokens: int
    step: float
    forward: float
    backward: float
    optimizer: float
    flops: float
    """The training FLOPs of one step as the family counts them (with LoRA: the frozen base and the adapters)."""
    counted_flops: float
    """FlopCounterMode's count of the same step's forward and backward (with LoRA: no frozen weights' gradients)."""
    lora: bool
    """Whether only LoRA adapters trained."""
    peak_memory: int

    @property
    def used_flops(self) -> float:
        """What the MFU divides: the family's count."""
        return self.flops


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


def model_inputs(cfg: ModelConfig, batch: int, tokens: int, text_len: int, *, device=None,
                 dtype: Optional[torch.dtype] = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Random (x, t, cond) of ``tokens`` image tokens and ``text_len`` text tokens, none of them padding; a family
    that takes reference images gets as many as it declares, each the target's size (as the loader sizes them), so
    that the step measured and counted is the one its FLOP count describes."""
    side = math.isqrt(tokens) * cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.rand(batch, generator=g)
    extra = {"guidance": torch.full((batch,), 3.5)} if cfg.guidance_embed else {}
    cond = Conditioning(torch.randn(batch, text_len, cfg.context_dim, generator=g),
                        torch.ones(batch, text_len, dtype=torch.bool), torch.randn(batch, cfg.pooled_dim, generator=g),
                        extra, all_valid=True)
    references = [torch.randn(x.shape, generator=g) for _ in range(family_of(cfg).capabilities.references)]
    cond = cond.with_reference(references) if references else cond
    return x.to(device, dtype), t.to(device, dtype), cond.to(device, dtype)


def lora_config(args: argparse.Namespace) -> Optional[LoraConfig]:
    """The adapters of ``--lora RANK`` (the family's default targets, alpha = rank), or None for full training."""
    return LoraConfig(rank=args.lora, alpha=args.lora) if args.lora else None


def counted_step_flops(cfg: ModelConfig, lora: Optional[LoraConfig], batch: int, tokens: int, text_len: int) -> float:
    """FlopCounterMode's count of one training step's forward and backward, on a meta-device copy (nothing is
    computed or allocated); with ``lora``, only the adapters (and activations) receive gradients.

    The inputs require gradients too: the 6 x parameters x tokens convention of the families' counts includes the
    input gradient of every weight, the first layers' as well (a real step skips those, 2 FLOPs per weight and
    token of the input layers: negligible at release sizes, not at test sizes)."""
    with torch.device("meta"):
        model = family_of(cfg).build(cfg)
        if lora is not None:
            apply_lora(model, lora)
        x, t, cond = model_inputs(cfg, batch, tokens, text_len)
        x, t = x.requires_grad_(), t.requires_grad_()
        for tensor in (cond.hidden, cond.pooled, *cond.extra.values()):
            tensor.requires_grad_()
        with FlopCounterMode(display=False) as counter:
            model(x, t, cond).float().square().mean().backward()
    return float(counter.get_total_flops())


def training_step(engine: Engine, model: nn.Module, cfg: ModelConfig, tokens: int, text_len: int,
                  args: argparse.Namespace) -> Callable[[], tuple[float, float, float]]:
    """One training step on fixed random inputs of ``tokens`` image tokens; returns its (forward, backward,
    optimizer) seconds, each timed between device synchronisations."""
    device = engine.device
    x, t, cond = model_inputs(cfg, args.batch, tokens, text_len, device=device, dtype=engine.dtype, seed=engine.rank)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(engine.rank + 1)).to(device)

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


def measure(engine: Engine, model: nn.Module, cfg: ModelConfig, preset: str, tokens: int, text_len: int,
            args: argparse.Namespace) -> Measurement:
    """Train ``args.warmup + args.steps`` steps of ``tokens`` image tokens; medians of the timed ones."""
    device = engine.device
    step = training_step(engine, model, cfg, tokens, text_len, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases: list[tuple[float, float, float]] = []
    for i in range(args.warmup + args.steps):
        seconds = step()
        if i >= args.warmup:
            phases.append(seconds)
    fwd, bwd, opt = (statistics.median(p) for p in zip(*phases))
    side = math.isqrt(tokens) * cfg.patch_size
    flops = training_flops(cfg, lora_config(args), batch_size=args.batch, latent_size=(side, side),
                           text_len=text_len)
    counted = counted_step_flops(cfg, lora_config(args), args.batch, tokens, text_len)
    return Measurement(preset, tokens, statistics.median(sum(p) for p in phases), fwd, bwd, opt, flops=flops,
                       counted_flops=counted, lora=bool(args.lora), peak_memory=peak_memory(device))


def model_config(preset: str) -> ModelConfig:
    """The preset's model section, with the sizes its encoders would fill (:data:`OPEN_SIZES`) where it has none."""
    family = PRESET_FAMILY[preset]
    values = preset_values(preset)
    pooled = POOLED_SIZES[family.text.one_clip] if family.text is not None else POOLED_SIZES[True]
    open_sizes = {**OPEN_SIZES, "pooled_dim": pooled}
    return ModelConfig(**{**values, **{k: v for k, v in open_sizes.items() if values.get(k) is None}})


def text_length(family: Family, args: argparse.Namespace) -> int:
    """``--text-len``, else the family's pipeline's (T5's tokens, after CLIP's where its layout has CLIP states; a
    decoder LLM's max_length)."""
    if args.text_len is not None:
        return args.text_len
    if family.diffusers is None:
        return CLIP_TOKENS
    if family.diffusers.decoder_llm is not None:
        return int(family.diffusers.decoder_llm["max_length"])
    clip_states = family.text is not None and family.text.clip_states  # a T5-only family (Chroma) has no layout
    return family.diffusers.t5_tokens + (CLIP_TOKENS if clip_states else 0)


def build_model(cfg: ModelConfig, args: argparse.Namespace, engine: Engine) -> nn.Module:
    family = family_of(cfg)
    with engine.model_init():
        model = family.build(cfg)
    with engine.gathered_params(model, modify=True):
        model.init_weights()
    if args.lora:
        torch.manual_seed(0)
        apply_lora(model, lora_config(args))
    if family.capabilities.block_transforms:
        if args.checkpointing:
            apply_activation_checkpointing(model)
        if args.compile:
            apply_compile(model)
    elif args.compile:
        model.compile()  # no block transforms (the U-Net): the whole model, as one compiled module
    return model


def report(m: Measurement, peaks: list[tuple[str, float]]) -> str:
    tflops = m.used_flops / m.step / 1e12
    utilisation = ", ".join(f"MFU {mfu(m.used_flops, m.step, peak):.1%} of {name}" for name, peak in peaks)
    return (f"{m.preset} tokens {m.tokens:>5}: FLOPs/step {m.flops / 1e12:.4g} T (family) vs "
            f"{m.counted_flops / 1e12:.4g} T (FlopCounterMode, {m.counted_flops / m.flops - 1:+.2%}); step "
            f"{m.step * 1e3:9.1f} ms (forward {m.forward * 1e3:.1f}, backward {m.backward * 1e3:.1f}, optimizer "
            f"{m.optimizer * 1e3:.1f}), {tflops:.3f} TFLOP/s per device, {utilisation}; peak memory "
            f"{m.peak_memory / 2**30:.2f} GiB")


def measure_preset(preset: str, args: argparse.Namespace, dist: DistributedConfig) -> list[Measurement]:
    """Every token count of one preset, on a fresh engine."""
    cfg = model_config(preset)
    family = family_of(cfg)
    if args.lora and not family.capabilities.lora:
        print(f"{preset}: skipped, the {family.name} family has no LoRA")
        return []
    text_len = text_length(family, args)
    results = []
    with Engine(dist) as engine:
        model = build_model(cfg, args, engine)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine.setup(model, trainable, OptimConfig(lr=1e-5, warmup_steps=0),
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
            trained = sum(p.numel() for p in trainable) if args.zero < 3 else float("nan")
            print(f"{preset} ({family.name}): {params / 1e6:.1f}M parameters, {trained / 1e6:.1f}M trained "
                  f"({f'LoRA rank {args.lora}' if args.lora else 'full'}); {name} x {engine.world_size}, {args.dtype}, "
                  f"ZeRO-{args.zero}, compile {args.compile}, checkpointing {args.checkpointing}, batch "
                  f"{args.batch} per device, {text_len} text tokens, torch {torch.__version__}")
        for tokens in args.tokens:
            m = measure(engine, model, cfg, preset, tokens, text_len, args)
            results.append(m)
            if engine.is_main:
                print(report(m, peaks), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            step = training_step(engine, model, cfg, args.tokens[-1], text_len, args)
            with profile(activities=activities) as prof:
                step()
            if engine.is_main:
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15))
    return results


def main(argv: Optional[Sequence[str]] = None) -> list[Measurement]:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dist = DistributedConfig(zero_stage=args.zero, precision=args.dtype,
                             backend="nccl" if args.device == "cuda" else "gloo")
    return [m for preset in args.preset for m in measure_preset(preset, args, dist)]


if __name__ == "__main__":
    main()
