"""The modules particular to FLUX.2 (Black Forest Labs 2025; diffusers' Flux2Transformer2DModel), used by the
MMDiT when ``MMDiTConfig.mlp`` is ``swiglu`` and ``MMDiTConfig.modulation`` is ``shared``:

- :class:`SiluGate` and :class:`GatedMlp`: the feed-forward whose gate and value come out of one input linear
  (fc1: D -> 2H, then silu(first half) * second half, fc2: H -> D), without biases;
- :class:`SharedModulation`: one SiLU + linear per stream type (the joint blocks' image stream, their text stream,
  the single blocks), computed once per forward from the time (+ guidance) vector and handed to every block,
  in place of each block's own modulation linear.

The rest of FLUX.2 is FLUX.1's structure (:mod:`flowmatch.models.layers`: joint then single blocks, QK-norm,
RoPE) with biases off, and its four-axis RoPE (:func:`flowmatch.models.embeddings.flux2_rope_table`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.models.approximator import JOINT_STREAM, SINGLE, Modulations


class SiluGate(nn.Module):
    """silu(x[..., :H]) * x[..., H:]: (..., 2H) -> (..., H). No weights."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class GatedMlp(nn.Module):
    """fc1 -> SiluGate -> fc2: (..., dim) -> (..., dim) with ``hidden`` gated channels (fc1 is 2 * hidden wide)."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.act = SiluGate()
        self.fc2 = nn.Linear(hidden, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SharedModulation(nn.Module):
    """The time (+ guidance) vector (B, D) -> :class:`Modulations` for ``depth`` joint and ``single_blocks``
    single blocks, all joint blocks given the same (B, 12, D) rows (image stream's 6, then the text stream's) and
    all single blocks the same (B, 3, D). ``final`` is the vector itself: the final layer keeps its own adaLN
    linear (FLUX.2's norm_out)."""

    def __init__(self, dim: int, depth: int, single_blocks: int, *, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.depth, self.single_blocks = depth, single_blocks
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.img = nn.Linear(dim, JOINT_STREAM * dim, **kw)
        self.txt = nn.Linear(dim, JOINT_STREAM * dim, **kw)
        self.single = nn.Linear(dim, SINGLE * dim, **kw)

    def forward(self, vec: Tensor) -> Modulations:
        act = F.silu(vec)
        joint = torch.cat([self.img(act).unflatten(-1, (JOINT_STREAM, -1)),
                           self.txt(act).unflatten(-1, (JOINT_STREAM, -1))], dim=1)  # (B, 12, D)
        single = self.single(act).unflatten(-1, (SINGLE, -1))  # (B, 3, D)
        return Modulations(joint=[joint] * self.depth, single=[single] * self.single_blocks, final=vec)

