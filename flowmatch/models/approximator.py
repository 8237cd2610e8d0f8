"""The modulation approximator: one MLP that gives every block its adaLN modulation vectors from the timestep,
in place of a per-block modulation linear (Chroma, lodestones 2025: FLUX.1-schnell's layout with its 3.3B
parameters of per-block modulation replaced by one small network).

Each modulation vector of the model has a row index k; the approximator's input for row k is the sinusoid of
the scaled timestep, that of a guidance value (always 0: the released model was trained without one) and that
of k * 1000, side by side; a residual MLP maps each row to the model width. The rows are laid out as the
released model lays them out: the single blocks' (3 each) first, then the joint blocks' image streams (6 each),
their text streams (6 each), and the final layer's (shift, scale) last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowmatch.models.embeddings import timestep_embedding
from flowmatch.models.mlp import Mlp

#: Step between the row indices' sinusoid inputs (the released model's).
ROW_INDEX_SCALE = 1000.0
#: Modulation vectors per block: a joint block's stream (shift, scale, gate for attention and MLP), a single
#: block (shift, scale, gate) and the final layer (shift, scale).
JOINT_STREAM, SINGLE, FINAL = 6, 3, 2


@dataclass
class Modulations:
    """Every block's modulation vectors, each stack (B, chunks, D) in the order its block chunks it."""

    joint: list[Tensor]
    """Per joint block: (B, 12, D), the image stream's 6 then the text stream's 6."""
    single: list[Tensor]
    """Per single block: (B, 3, D)."""
    final: Tensor
    """The final layer's (B, 2, D): shift, scale."""


class ResidualMlp(nn.Module):
    """x + MLP(RMSNorm(x)): (B, M, D) -> (B, M, D); the norm is torch's, with its dtype's machine epsilon."""

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, device=device, dtype=dtype)
        self.mlp = Mlp(dim, hidden_features=dim, out_features=dim, act_layer=nn.SiLU, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class ModulationApproximator(nn.Module):
    """t (B,) already multiplied by the time scale -> :class:`Modulations` for ``depth`` joint and
    ``single_blocks`` single blocks of width ``dim``.

    ``channels`` is the input width per row (a quarter each for the time and guidance sinusoids, half for the
    row index's), ``hidden`` the MLP's width and ``layers`` its residual layers.
    """

    def __init__(self, depth: int, single_blocks: int, dim: int, *, channels: int, hidden: int, layers: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"approximator channels must be divisible by 4, got {channels}")
        self.depth, self.single_blocks, self.channels = depth, single_blocks, channels
        self.rows = SINGLE * single_blocks + 2 * JOINT_STREAM * depth + FINAL
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(channels, hidden, **kw)
        self.layers = nn.ModuleList(ResidualMlp(hidden, **kw) for _ in range(layers))
        self.out_proj = nn.Linear(hidden, dim, **kw)

    def row_inputs(self, device) -> Tensor:
        """The row indices' sinusoids (rows, channels / 2) float32, the same for every sample and step."""
        index = torch.arange(self.rows, device=device, dtype=torch.float32) * ROW_INDEX_SCALE
        return timestep_embedding(index, self.channels // 2)

    def inputs(self, t: Tensor) -> Tensor:
        """(B,) scaled timesteps -> (B, rows, channels) float32: [time, guidance = 0, row index] sinusoids."""
        quarter = self.channels // 4
        b = t.shape[0]
        time = timestep_embedding(t, quarter)  # (B, C/4)
        guidance = timestep_embedding(torch.zeros_like(t, dtype=torch.float32), quarter)  # (B, C/4)
        rows = self.row_inputs(t.device)  # (M, C/2)
        per_sample = torch.cat([time, guidance], dim=-1)[:, None].expand(b, self.rows, 2 * quarter)
        return torch.cat([per_sample, rows[None].expand(b, -1, -1)], dim=-1)

    def forward(self, t: Tensor) -> Modulations:
        x = self.in_proj(self.inputs(t).to(self.in_proj.weight.dtype))  # (B, M, hidden)
        for layer in self.layers:
            x = layer(x)
        mods = self.out_proj(x)  # (B, M, D)
        singles = SINGLE * self.single_blocks
        txt = singles + JOINT_STREAM * self.depth

        def joint(i: int) -> Tensor:
            img_rows = mods[:, singles + JOINT_STREAM * i: singles + JOINT_STREAM * (i + 1)]
            txt_rows = mods[:, txt + JOINT_STREAM * i: txt + JOINT_STREAM * (i + 1)]
            return torch.cat([img_rows, txt_rows], dim=1)

        return Modulations(joint=[joint(i) for i in range(self.depth)],
                           single=[mods[:, SINGLE * j: SINGLE * (j + 1)] for j in range(self.single_blocks)],
                           final=mods[:, -FINAL:])
