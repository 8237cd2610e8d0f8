"""The small layers every block uses: the two-layer MLP, the bias-free SwiGLU and RMS normalisation.

They are what timm's ``Mlp`` (with p = 0 dropouts and no inner norm) and ``RmsNorm`` (without apex) compute, with
the same parameter names (``fc1``, ``fc2``, ``weight``) and the same operation order, written here because
importing timm costs about 2.7 s of CPU in every process (it pulls in torchvision, dynamo and sympy), which every
launched training process and test paid for these two layers alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """fc1 -> act -> fc2: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, *, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) without biases: (..., dim) -> (..., dim). The single-stream families' feed-forward
    (Z-Image, Lumina-Image-2); ``gate_fp32`` takes the SiLU in float32 as Lumina-Image-2 does."""

    def __init__(self, dim: int, hidden: int, *, gate_fp32: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_fp32 = gate_fp32
        self.w1 = nn.Linear(dim, hidden, **kw)
        self.w2 = nn.Linear(hidden, dim, **kw)
        self.w3 = nn.Linear(dim, hidden, **kw)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.w1(x)
        act = F.silu(gate.float()).to(gate.dtype) if self.gate_fp32 else F.silu(gate)
        return self.w2(act * self.w3(x))


class RmsNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension (diffusers' RMSNorm's order)."""

    def __init__(self, channels: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """The unit scale it starts from (after ``to_empty`` from the meta device)."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
