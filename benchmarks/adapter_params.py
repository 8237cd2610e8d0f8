"""Trainable parameters of each adapter kind (model.lora.kind) at the released shapes, beside LoRA's at the same
rank: peft injects every kind on the meta device (nothing allocated), on each family's default targets.

    .venv/bin/python benchmarks/adapter_params.py              # rank 16, SD3-medium and FLUX.1-dev
    .venv/bin/python benchmarks/adapter_params.py --rank 4 --factor 8

Counts, not timings: exact for the shapes, whatever the machine.
"""

from __future__ import annotations

import argparse

import torch

from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import config_from_preset
from flowmatch.models.lora import KINDS, LoraConfig
from flowmatch.models.mmdit import MMDiT

#: The released shapes: preset and the encoder sizes its pipeline feeds (SD3: T5-XXL 4096 and CLIP-L+G pooled 2048;
#: FLUX.1: T5-XXL 4096 and CLIP-L pooled 768).
SHAPES = {"sd3-medium": dict(in_channels=16, context_dim=4096, pooled_dim=2048),
          "flux-dev": dict(in_channels=16, context_dim=4096, pooled_dim=768)}


def trainable(preset: str, lora: LoraConfig) -> tuple[int, int]:
    """(adapter parameters, base parameters) of ``preset`` with ``lora`` injected, on the meta device."""
    with torch.device("meta"):
        model = MMDiT(config_from_preset(preset, **SHAPES[preset]), device="meta")
        base = sum(p.numel() for p in model.parameters())
        apply_lora(model, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--factor", type=int, default=-1, help="lokr's decompose factor (-1: near the square root)")
    args = parser.parse_args(argv)
    print(f"rank {args.rank}, lokr factor {args.factor}, default targets; trainable parameters (x LoRA's)")
    for preset in SHAPES:
        counts = {kind: trainable(preset, LoraConfig(rank=args.rank, alpha=args.rank, kind=kind, factor=args.factor))
                  for kind in KINDS}
        base = counts["lora"][1]
        print(f"{preset} ({base / 1e9:.2f}B base parameters):")
        for kind, (n, _) in counts.items():
            print(f"  {kind:5s} {n:>12,d}  {n / counts['lora'][0]:6.3f}x  ({100 * n / base:.3f}% of the base)")


if __name__ == "__main__":
    main()
