"""Input embeddings of the MMDiT: patches, positions, timesteps and the pooled text vector.

Positions and timesteps are computed on the fly from the input size, on the input's device, so the model has
no buffers: meta-device construction needs nothing recomputed, and any resolution up to the position grid works.

The two-layer embedder MLP is :class:`flowmatch.models.mlp.Mlp` (timm's `Mlp` computed alike). The position
tables are written here because timm's do not have these layouts: its sin-cos grid (`build_sincos2d_pos_embed`)
has neither SD3's scaled, centre-cropped grid nor its channel order, and its rotary tables
(`build_rotary_pos_embed`) give every axis the same bands over the whole head, where FLUX's layout takes per-axis
channel counts (`rope_axes_dim`), unrotated tail channels and text tokens at position 0. timm has no DDPM-style
timestep embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.models.mlp import Mlp

#: Sinusoid period used by DDPM/SD3 timestep embeddings and by SD3's sin-cos position grid.
SINUSOID_MAX_PERIOD = 10000.0
#: Standard deviation of the normal init of the timestep and pooled-text MLPs (DiT, Peebles & Xie 2023).
EMBEDDER_INIT_STD = 0.02


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, row-major.

    x: (B, C, H, W) with H, W divisible by patch_size -> (B, H/p * W/p, p * p * C), features ordered (p_row, p_col, C).
    """
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, grid_h: int, grid_w: int, patch_size: int) -> Tensor:
    """Inverse of `patchify`: (B, grid_h * grid_w, p * p * C) -> (B, C, grid_h * p, grid_w * p)."""
    b, _, f = tokens.shape
    p = patch_size
    c = f // (p * p)
    x = tokens.reshape(b, grid_h, grid_w, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, c, grid_h * p, grid_w * p)


def trig_dtype(device: torch.device) -> torch.dtype:
    """The dtype position angles are computed in: float64 (as SD3, FLUX and the releases' tables are) where the
    device has it; MPS has none, float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """pos: (M,) -> (M, dim) laid out as [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (dim / 2))."""
    dtype = trig_dtype(pos.device)
    omega = torch.arange(dim // 2, device=pos.device, dtype=dtype) / (dim / 2.0)
    omega = SINUSOID_MAX_PERIOD ** (-omega)
    angles = pos.to(dtype)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(
    grid_h: int, grid_w: int, dim: int, *, base_size: int, max_size: int, device: torch.device
) -> Tensor:
    """SD3's 2D sin-cos position embedding for a (grid_h, grid_w) token grid, cropped from a square max grid.

    The full grid has max_size x max_size positions spaced so that it spans base_size units (SD3 paper, section
    5.3.1: positions are scaled to the training resolution and a centred crop is taken for other sizes). The
    column (x) embedding fills the first half of the channels and the row (y) embedding the second half.

    Returns (grid_h * grid_w, dim) float32, row-major like `patchify`.
    """
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(
            f"a {grid_h}x{grid_w} token grid exceeds pos_embed_max_size={max_size}; "
            "use smaller inputs, a larger patch_size, or raise pos_embed_max_size"
        )
    step = max_size / base_size
    top = (max_size - grid_h) // 2
    left = (max_size - grid_w) // 2
    rows = torch.arange(top, top + grid_h, device=device, dtype=torch.float32) / step
    cols = torch.arange(left, left + grid_w, device=device, dtype=torch.float32) / step
    emb_x = _sincos_1d(cols, dim // 2)  # (w, D/2)
    emb_y = _sincos_1d(rows, dim // 2)  # (h, D/2)
    emb = torch.cat(
        [emb_x[None, :, :].expand(grid_h, grid_w, -1), emb_y[:, None, :].expand(grid_h, grid_w, -1)], dim=-1
    )
    return emb.reshape(grid_h * grid_w, dim).float()


def timestep_embedding(t: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding of timesteps, always in float32.

    t: (B,) -> (B, dim) laid out as [cos(a_i), sin(a_i)], a_i = (t * f_i) * scale, f_i = 10000^(-i / (dim / 2)),
    the layout of SD3's `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`; `scale` is its `scale`
    argument (Qwen-Image's 1000), applied after the product as there, which float32 rounds differently from
    scaling t first (6e-5 apart at t * 1000 ~ 1000).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(SINUSOID_MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    if scale != 1.0:
        angles = angles * scale
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def mlp_embedder(in_dim: int, dim: int, *, bias: bool = True, device=None, dtype=None) -> Mlp:
    """Two-layer SiLU MLP (`Mlp`, hidden width `dim`) mapping a per-sample vector to the model width:
    (B, in_dim) -> (B, dim). SD3's timestep and pooled-text embedders (FLUX.2's without biases)."""
    return Mlp(in_dim, hidden_features=dim, out_features=dim, act_layer=nn.SiLU, bias=bias, device=device,
               dtype=dtype)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim); the sinusoid stays float32 even under bf16. `scale` multiplies the sinusoid's angles
    (:func:`timestep_embedding`); with the default 1, t comes already multiplied by the time scale."""

    def __init__(self, freq_dim: int, dim: int, *, scale: float = 1.0, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = mlp_embedder(freq_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, t: Tensor) -> Tensor:
        freqs = timestep_embedding(t, self.freq_dim, self.scale)
        # Cast only after the sinusoid: bf16 cannot resolve t * 1000 to better than a few units.
        return self.mlp(freqs.to(self.mlp.fc1.weight.dtype))


@dataclass
class RopeTable:
    """Rotation angles for RoPE, one row per token of the joint sequence (image tokens first in the MMDiT's).

    cos, sin: (S, 1, head_dim / 2) float32, or (B, S, 1, head_dim / 2) where positions differ per sample (the
    per-caption tables of flowmatch.models.lumina2 and zimage), broadcast over (B, S, H, head_dim / 2) pairs.
    """

    cos: Tensor
    sin: Tensor

    def head(self, n: int) -> "RopeTable":
        """The (S, 1, head_dim / 2) table restricted to the first n tokens (the query rows of a context-pre-only
        block)."""
        return RopeTable(self.cos[:n], self.sin[:n])


def rope_table(
    grid_h: int, grid_w: int, text_len: int, *, head_dim: int, axes_dim: Sequence[int], theta: float, device,
    references: Sequence[tuple[int, int]] = (),
) -> RopeTable:
    """RoPE angles as in FLUX, over position ids with one entry per axis.

    With two axes an image token (i, j) has ids (i, j); with three, FLUX's (0, i, j), whose first axis (an image
    index, 0 for the generated image) leaves its channels unrotated. ``references`` are the (rows, columns) token
    grids of reference images whose tokens follow the image's: reference k's token (i, j) has ids (k + 1, i, j)
    (FLUX.1 Kontext: index 1, rows and columns from 0, as the target's); they need the image-index axis. Axis k
    rotates the next axes_dim[k] channels
    at frequencies theta^(-2m / axes_dim[k]); text tokens have all ids 0 (no rotation); channels past the axes
    are not rotated. Angles are computed in float64 where the device has it (as FLUX's reference does), then the
    cosines and sines are stored in float32.
    """
    if references and len(axes_dim) != 3:
        raise ValueError(f"reference images need RoPE's image-index axis (three rope_axes_dim), got {list(axes_dim)}")
    dtype = trig_dtype(torch.device(device))
    grids = [(0, grid_h, grid_w)] + [(k + 1, h, w) for k, (h, w) in enumerate(references)]
    index = torch.cat([torch.full((h * w,), float(i), device=device, dtype=dtype) for i, h, w in grids])
    rows = torch.cat([torch.arange(h, device=device, dtype=dtype).repeat_interleave(w) for _, h, w in grids])
    cols = torch.cat([torch.arange(w, device=device, dtype=dtype).repeat(h) for _, h, w in grids])
    ids = [index] * (len(axes_dim) - 2) + [rows, cols]
    parts = []
    for pos, d in zip(ids, axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=dtype) / d)
        parts.append(pos[:, None] * freqs[None, :])  # (N, d / 2)
    angles = torch.cat(parts, dim=1)
    unrotated = head_dim // 2 - angles.shape[1]
    angles = F.pad(angles, (0, unrotated, 0, text_len))  # (S, head_dim / 2)
    return RopeTable(torch.cos(angles).float()[:, None, :], torch.sin(angles).float()[:, None, :])


def msrope_table(
    grid_h: int, grid_w: int, text_len: int, *, head_dim: int, axes_dim: Sequence[int], theta: float, device,
    references: Sequence[tuple[int, int]] = (),
) -> RopeTable:
    """RoPE angles as in Qwen-Image's MSRoPE (Qwen-Image technical report, section 2.3), rows [image,
    references, text].

    Three axes (frame, row, column): an image token (i, j) of the generated image has positions
    (0, i - ceil(h / 2), j - ceil(w / 2)), a grid centred on the origin; reference k's (rows, columns) grid in
    ``references`` is centred the same way at frame k + 1 (Qwen-Image-Edit's image index); text token n has
    position m + n on all three axes, m = the largest max(h // 2, w // 2) of the grids, on the diagonal just past
    the images. Axis a rotates the next axes_dim[a] channels at frequencies theta^(-2m / axes_dim[a]). Angles are
    products of float32 positions and float32 frequencies, as QwenImageTransformer2DModel's tables are; channels
    past the axes are not rotated.
    """
    if len(axes_dim) != 3:
        raise ValueError(f"MSRoPE rotates three axes (frame, row, column), got axes_dim={list(axes_dim)}")
    grids = [(grid_h, grid_w), *references]
    frames = torch.cat([torch.full((h * w,), k, device=device) for k, (h, w) in enumerate(grids)])
    rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) - (h - h // 2) for h, w in grids])
    cols = torch.cat([torch.arange(w, device=device).repeat(h) - (w - w // 2) for h, w in grids])
    text = max(max(h // 2, w // 2) for h, w in grids) + torch.arange(text_len, device=device)
    ids = [torch.cat([image, text]).float() for image in (frames, rows, cols)]  # 3 x (S,)
    parts = []
    for pos, d in zip(ids, axes_dim):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        parts.append(pos[:, None] * freqs[None, :])  # (S, d / 2)
    angles = F.pad(torch.cat(parts, dim=1), (0, head_dim // 2 - sum(axes_dim) // 2))  # (S, head_dim / 2)
    return RopeTable(torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :])


def flux2_rope_table(
    grid_h: int, grid_w: int, text_len: int, *, head_dim: int, axes_dim: Sequence[int], theta: float, device,
    references: Sequence[tuple[int, int]] = (),
) -> RopeTable:
    """RoPE angles as in FLUX.2, rows [image, text], over four axes (time, row, column, sequence): an image
    token (i, j) has ids (0, i, j, 0) and text token n has (0, 0, 0, n), so, unlike FLUX.1, text tokens are
    rotated by their place in the caption. Axis a rotates the next axes_dim[a] channels at frequencies
    theta^(-2m / axes_dim[a]), computed in float64 where the device has it (as Flux2PosEmbed does); channels past
    the axes are not rotated. No reference images (FLUX.2's editing inputs are not implemented)."""
    if len(axes_dim) != 4 or references:
        raise ValueError(f"FLUX.2's RoPE rotates four axes (time, row, column, sequence) and takes no reference "
                         f"images here, got axes_dim={list(axes_dim)}, {len(references)} reference(s)")
    dtype = trig_dtype(torch.device(device))
    rows = torch.arange(grid_h, device=device, dtype=dtype).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=dtype).repeat(grid_h)
    zeros_img, zeros_txt = rows.new_zeros(grid_h * grid_w), rows.new_zeros(text_len)
    seq = torch.arange(text_len, device=device, dtype=dtype)
    ids = [torch.cat([zeros_img, zeros_txt]), torch.cat([rows, zeros_txt]), torch.cat([cols, zeros_txt]),
           torch.cat([zeros_img, seq])]  # 4 x (S,)
    parts = []
    for pos, d in zip(ids, axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=dtype) / d)
        parts.append(pos[:, None] * freqs[None, :])  # (S, d / 2)
    angles = F.pad(torch.cat(parts, dim=1), (0, head_dim // 2 - sum(axes_dim) // 2))  # (S, head_dim / 2)
    return RopeTable(torch.cos(angles).float()[:, None, :], torch.sin(angles).float()[:, None, :])


#: How token positions become RoPE angles, by ``MMDiTConfig.rope_layout``.
ROPE_LAYOUTS = {"flux": rope_table, "msrope": msrope_table, "flux2": flux2_rope_table}
#: How many position axes (``MMDiTConfig.rope_axes_dim`` entries) each layout takes, those whose tables their own
#: networks build (lumina2, zimage: flowmatch.models.lumina2 / zimage) included.
ROPE_AXES = {"flux": (2, 3), "msrope": (3,), "flux2": (4,), "lumina2": (3,), "zimage": (3,)}


def apply_rope(x: Tensor, table: Optional[RopeTable]) -> Tensor:
    """Rotate channel pairs (2k, 2k + 1) of x: (B, S, H, head_dim) by the table's angles, in float32."""
    if table is None:
        return x
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * table.cos - x1 * table.sin, x0 * table.sin + x1 * table.cos], dim=-1)
    return out.flatten(-2).type_as(x)
