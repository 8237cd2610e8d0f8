"""Precision names used in recipes (fp32, bf16, fp16) and the torch dtypes they stand for: the one table."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Recipe precision name -> torch dtype."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a recipe's precision name means on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere (CPU
    bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]
