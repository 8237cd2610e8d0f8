"""The memory planner (flowmatch plan) against measurement on this machine's CPU: for each case, the planned peak
of one training process and the peak it really reaches, and their ratio (planned / measured).

Each case runs in a fresh process: its recipe is counted by the planner (flowmatch.plan), then its model is built
on the CPU as the trainer builds it (its family's network, LoRA adapters, activation checkpointing), with the
engine's optimizer (``optim.name``) and an fp32 EMA of every copy the recipe keeps, and trained for a few steps of
the recipe's objective (``flowmatch.flow.objective_loss``, the trainer's) on random inputs of the recipe's shapes
(the text at its encoders' max_length). The encoders are not loaded: the inputs stand for
cached features, and the plan is read without its frozen-encoder term (which is their configs' parameter count
times their dtype).

Measured = the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs just before the model
is built) minus its resident memory at that moment, so imports and the interpreter are not counted. glibc's
malloc is told to return every block of 64 KiB or more to the system when freed (MALLOC_MMAP_THRESHOLD_), so
resident memory follows what the tensors hold rather than the allocator's caching.

    python benchmarks/memory.py                  # every case below
    python benchmarks/memory.py --case lora      # one case
    python benchmarks/memory.py --smoke          # tiny sizes, in this process: the test suite's path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.engine.ema import ShadowEma
from flowmatch.engine.optim import adamw_implementation
from flowmatch.engine.optimizers import build_optimizer
from flowmatch.families import build_backbone
from flowmatch.families.lora import apply_lora
from flowmatch.flow import ObjectiveModels, TimeSchedule, objective_loss
from flowmatch.flow.jvp import fp32_call
from flowmatch.models.parallelize import apply_activation_checkpointing
from flowmatch.plan.devices import budget_device
from flowmatch.plan.memory import peak
from flowmatch.plan.planner import make_plan, recipe_settings
from flowmatch.plan.shape import model_cost
from flowmatch.quantize import QuantizedLinear, quantize_frozen
from flowmatch.training.fewstep import jvp_backend

ROOT = Path(__file__).resolve().parents[1]
# A mid-size sd3-family MMDiT: 4 joint blocks of 16 heads x 64 (width 1024), about 150M parameters, on 1-channel
# 32 x 32 inputs (16 x 16 tokens of 2 x 2) and the digits recipe's MiniLM text encoder (384 wide) at 32 tokens.
_MID = ["model.preset=digits", "model.depth=4", "model.num_heads=16", "model.head_dim=64", "model.sample_size=16",
        "model.pos_embed_max_size=16", "data.resolution=32", "text_encoder.max_length=32", "train.batch_size=4",
        "train.ema_profiles=[]"]
CASES: dict[str, list[str]] = {
    # The digits recipe as it trains: full training in fp32, micro batch 128, an EMA and two post-hoc profiles.
    "digits": [],
    # LoRA rank 16 on the default targets of the frozen mid-size model, activation checkpointing, no EMA.
    "lora": [*_MID, "model.init_from=random", "model.lora.rank=16", "train.activation_checkpointing=true",
             "train.ema_decay=0", "train.ema_profiles=[]"],
    # The same with its frozen base in nf4 (model.quantize, bitsandbytes on the CPU).
    "lora-nf4": [*_MID, "model.init_from=random", "model.lora.rank=16", "train.activation_checkpointing=true",
                 "train.ema_decay=0", "train.ema_profiles=[]", "model.quantize=nf4"],
    # Full fine-tune of the mid-size model: AdamW and one fp32 EMA, micro batch 2.
    "full": [*_MID, "train.batch_size=2", "data.resolution=16", "text_encoder.max_length=16"],
    # The same with Adafactor: factored second moments (a row and a column per matrix) instead of AdamW's two.
    "adafactor": [*_MID, "train.batch_size=2", "data.resolution=16", "text_encoder.max_length=16",
                  "optim.name=adafactor"],
    # MeanFlow with the exact JVP on the digits model at 64 x 64 (1,024 image tokens), every row on an interval:
    # the JVP's math attention (scores and their tangents, fp32) holds more than the trained step that follows.
    "meanflow": ["data.resolution=64", "model.sample_size=32", "model.pos_embed_max_size=32",
                 "model.interval_embed=true", "flow.objective=meanflow", "flow.meanflow.interval_fraction=1.0",
                 "train.batch_size=4", "train.ema_decay=0", "train.ema_profiles=[]"],
}
SMOKE = ["model.preset=tiny", "train.batch_size=4", "text_encoder.max_length=8", "train.ema_profiles=[]"]
STEPS = 2


def rss_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(overrides: list[str], steps: int = STEPS) -> dict[str, float]:
    """Plan and train one case in this process: {planned, measured} bytes."""
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", overrides)
    if recipe.train.block_swap:  # on a CPU the "device" is the host: the swap's two copies are both resident
        raise ValueError("train.block_swap cannot be measured on a CPU (device and host memory are one); "
                         "tests/test_plan_swap.py checks the planned bytes against the blocks the swap moves")
    cost, seq, recipe = model_cost(recipe)
    settings = recipe_settings(recipe, 1).replace(cached=True)  # the encoders are not loaded here
    planned = peak(cost, settings, cuda=False)
    # The same plan through make_plan (as flowmatch plan prints it) for the breakdown.
    plan = make_plan(recipe, budget_device(1024, cuda=False), 1, cost=(cost, seq))
    cfg, micro = recipe.model, settings.micro_batch
    channels, side, _ = seq.latent
    torch.manual_seed(0)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = rss_kib("VmRSS")
    model = build_backbone(cfg)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    if cfg.quantize is not None:  # as the trainer does, after the adapters
        quantize_frozen(model, cfg.quantize)
        # The full-precision build is the host's in a GPU run (quantised before it moves): forget its peak.
        Path("/proc/self/clear_refs").write_text("5")
    if recipe.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    opt = build_optimizer(o.name, params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                          implementation=adamw_implementation(torch.device("cpu")))
    emas = [ShadowEma(params, 0.999) for _ in range(settings.ema_copies)]
    x = torch.randn(micro, channels, side, side)
    cond = Conditioning(torch.randn(micro, seq.text_tokens, cfg.context_dim),
                        torch.ones(micro, seq.text_tokens, dtype=torch.bool), torch.randn(micro, cfg.pooled_dim))
    if seq.references:  # the references the plan counted, each the target's size
        cond = cond.with_reference([torch.randn_like(x) for _ in range(seq.references)])
    null = Conditioning(torch.zeros_like(cond.hidden[:1]), cond.mask[:1], torch.zeros_like(cond.pooled[:1]))

    def velocity(x, t, cond, r=None):
        return model(x, t, cond) if r is None else model(x, t, cond, r=r)

    def frozen(x, t, cond, r=None):
        with torch.no_grad():
            return velocity(x, t, cond, r)

    models = ObjectiveModels(student=velocity, frozen=frozen, tangent=lambda *a, **k: fp32_call(model, *a, **k))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = objective_loss(models, x, cond, null, schedule=TimeSchedule(recipe.flow), flow=recipe.flow,
                              seq_len=seq.image_tokens, generator=generator, jvp_backend=jvp_backend(recipe)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for ema in emas:
            ema.update(params)
    measured = (rss_kib("VmHWM") - baseline) * 1024
    return {"planned": planned, "measured": measured, "trained": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in model.parameters())
            + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)),
            "breakdown": {line.name: line.bytes for line in plan.lines if line.name != "frozen encoders"}}


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def report(name: str, r: dict) -> str:
    mib = 2**20
    parts = ", ".join(f"{k} {v / mib:.0f}" for k, v in r["breakdown"].items() if v)
    # In-process (the smoke path) the allocator may reuse memory freed earlier: nothing new is resident, no ratio.
    ratio = f"{r['planned'] / r['measured']:.3f}" if r["measured"] > 0 else "-"
    return (f"{name:>7}: {r['parameters'] / 1e6:7.1f}M params ({r['trained'] / 1e6:.1f}M trained)  planned "
            f"{r['planned'] / mib:7.1f} MiB  measured {r['measured'] / mib:7.1f} MiB  ratio {ratio}   [MiB: {parts}]")


def main(argv: list[str] | None = None) -> int | dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument("--smoke", action="store_true", help="a tiny case in this process (the test suite's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.child:
        print(json.dumps(measure(CASES[ns.child])))
        return 0
    if ns.smoke:
        result = measure(SMOKE, steps=1)
        print(report("smoke", result))
        return result
    print("planned / measured peak of one CPU training process (VmHWM minus resident memory before the model)")
    for name in ns.case or list(CASES):
        out = subprocess.run([sys.executable, __file__, "--child", name], env=child_env(), check=True,
                             capture_output=True, text=True)
        print(report(name, json.loads(out.stdout.strip().splitlines()[-1])), flush=True)
    return 0


if __name__ == "__main__":
    main()
