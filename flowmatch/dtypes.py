"""Precision names used in recipes and the torch dtypes they stand for: the one table the package reads.

``fp32``, ``bf16`` and ``fp16`` name a dtype outright; ``auto`` (for frozen modules such as the encoders) is bf16
on CUDA and fp32 elsewhere, because bf16 matmuls on CPU are slow.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of precision ``name`` (a key of :data:`DTYPES`, or ``auto``) for modules placed on ``device``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"precision must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
