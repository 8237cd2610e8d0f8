"""Per-token quantisation of cached text features: int8, or fp8 e4m3 where torch has it, each token row with
its own scale.

A token's hidden state (D,) is stored as D one-byte codes and one float32 scale, the row's largest magnitude
over the code range (127 for int8, 448, the largest finite e4m3 value, for fp8): half the bytes of bf16 for
D >> 4. Rows are scaled separately because text encoders' token norms differ by orders of magnitude (the
first token and padding-like tokens of T5 and BERT-style encoders stand out), which a single scale per tensor
would crush into a few codes.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
KINDS = ("int8", "fp8")


def fp8_supported() -> bool:
    """Whether this torch has the float8 e4m3 dtype."""
    return hasattr(torch, "float8_e4m3fn")


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, D) float -> codes (n, D) int8 or float8_e4m3fn, scale (n,) float32; x ~= codes * scale[:, None]."""
    if kind not in KINDS:
        raise ValueError(f"text quantisation must be one of {KINDS}, got {kind!r}")
    if kind == "fp8" and not fp8_supported():
        raise ValueError("fp8 text features need torch >= 2.1 (torch.float8_e4m3fn); use int8")
    x = x.detach().float()
    top = INT8_MAX if kind == "int8" else FP8_MAX
    scale = x.abs().amax(dim=-1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    scaled = x / scale[:, None]
    if kind == "int8":
        codes = scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.contiguous(), scale.contiguous()


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (n, D), scale (n,) -> (n, D) float32."""
    return codes.float() * scale.float()[:, None]
