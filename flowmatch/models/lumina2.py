"""Lumina-Image-2's single-stream transformer (Alpha-VLLM, "Lumina-Image 2.0", 2025; diffusers'
``Lumina2Transformer2DModel``), described by an :class:`MMDiTConfig` with ``rope_layout: lumina2``.

Captions and image tokens are refined apart first (context refiners: no modulation, caption mask; noise refiners:
modulated, image tokens only), then run through one stack of joint single-stream blocks over [caption, image].
Every block is pre- and post-normalised with RMSNorm, gates its residuals with tanh, attends with grouped-query
attention and QK-norm, and feeds a SwiGLU without biases. RoPE has three axes: caption token k sits at (k, 0, 0),
image token (i, j) at (caption length, i, j), so the image's first-axis position depends on each caption's number
of valid tokens (computed on the device from the mask: no host read).

The sequence is laid out as [all L caption tokens, image tokens] with padded caption keys masked, where diffusers
packs each sample's valid caption tokens and image tokens to the front; attention does not depend on where a token
sits in the sequence, only on its RoPE position and the mask, so both give the same image outputs.

Time: the released network takes ``1 - t`` and predicts ``data - noise`` (t = 0 noise there). This module takes
flowmatch's t (t = 0 data) and returns flowmatch's velocity ``noise - data``: it reverses the time on input and
negates its output, so nothing else in flowmatch knows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.conditioning import Conditioning
from flowmatch.models.embeddings import (
    EMBEDDER_INIT_STD,
    RopeTable,
    TimestepEmbedder,
    patchify,
    trig_dtype,
    unpatchify,
)
from flowmatch.models.key_padding import key_padding_mask, uses_flex
from flowmatch.models.layers import AdaLNModulation, SelfAttention, init_linears_and_norms
from flowmatch.models.mlp import RmsNorm, SwiGLU
from flowmatch.models.mmdit_config import MMDiTConfig, check_latents_and_text

#: The ``MMDiTConfig.rope_layout`` that describes this network rather than an MMDiT.
ROPE_LAYOUT = "lumina2"
#: Width of the time vector every modulation reads: min(width, TIME_WIDTH) (Lumina2CombinedTimestepCaptionEmbedding).
TIME_WIDTH = 1024
#: Epsilon of the QK-norm (the release's attention, whatever norm_eps says).
QK_NORM_EPS = 1e-5
#: Epsilon of the final, parameter-free LayerNorm (LuminaLayerNormContinuous in the release).
FINAL_NORM_EPS = 1e-6


def ffn_hidden(cfg: MMDiTConfig) -> int:
    """The SwiGLU hidden width: int(mlp_ratio * width) rounded up to a multiple of ffn_multiple_of (LuminaFeedForward's
    ``multiple_of * ceil(int(ffn_dim_multiplier * 4 D) / multiple_of)``, with mlp_ratio = 4 ffn_dim_multiplier)."""
    m = cfg.ffn_multiple_of
    return m * ((cfg.mlp_hidden + m - 1) // m)


class Lumina2Block(nn.Module):
    """Sandwich-normalised block with tanh-gated residuals; ``modulated`` blocks scale their inputs and gate their
    outputs from the time vector (noise refiners and joint blocks), the others do neither (context refiners).

    forward(x (B, S, D), mask (B, 1, 1, S) or None, rope, temb (B, min(D, 1024)) or None) -> (B, S, D)
    """

    def __init__(self, cfg: MMDiTConfig, *, modulated: bool, device=None, dtype=None) -> None:
        super().__init__()
        d, kw = cfg.width, dict(device=device, dtype=dtype)
        self.mod = AdaLNModulation(d, 4, in_dim=min(d, TIME_WIDTH), **kw) if modulated else None
        self.attn = SelfAttention(d, cfg.num_heads, cfg.head_dim, qk_norm=True, eps=QK_NORM_EPS, kv_heads=cfg.kv_heads,
                                  bias=False, **kw)
        self.ffn = SwiGLU(d, ffn_hidden(cfg), gate_fp32=True, **kw)
        self.attn_norm_in = RmsNorm(d, eps=cfg.norm_eps, **kw)
        self.attn_norm_out = RmsNorm(d, eps=cfg.norm_eps, **kw)
        self.ffn_norm_in = RmsNorm(d, eps=cfg.norm_eps, **kw)
        self.ffn_norm_out = RmsNorm(d, eps=cfg.norm_eps, **kw)

    def forward(self, x: Tensor, mask: Optional[Tensor], rope: RopeTable, temb: Optional[Tensor] = None) -> Tensor:
        if self.mod is None:
            x = x + self.attn_norm_out(self.attn(self.attn_norm_in(x), mask, rope))
            return x + self.ffn_norm_out(self.ffn(self.ffn_norm_in(x)))
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.mod(temb)  # each (B, 1, D)
        attn = self.attn(self.attn_norm_in(x) * (1 + scale_attn), mask, rope)
        x = x + gate_attn.tanh() * self.attn_norm_out(attn)
        ffn = self.ffn(self.ffn_norm_in(x) * (1 + scale_ffn))
        return x + gate_ffn.tanh() * self.ffn_norm_out(ffn)


class NoiseRefinerBlock(Lumina2Block):
    """A modulated block over the image tokens alone, before they meet the caption: never given a mask. A class of
    its own because it is called with other inputs than the joint blocks (no mask, the image rows of the RoPE table),
    so it compiles to a graph of its own (``model.blocks()``'s types are its compiled graphs)."""


class Lumina2FinalLayer(nn.Module):
    """Parameter-free LayerNorm scaled (no shift) from the time vector, then a linear map to patch pixels:
    (B, N, D) -> (B, N, p * p * C_out)."""

    def __init__(self, dim: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.mod = AdaLNModulation(dim, 1, in_dim=min(dim, TIME_WIDTH), device=device, dtype=dtype)
        self.linear = nn.Linear(dim, out_features, device=device, dtype=dtype)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        (scale,) = self.mod(temb)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=FINAL_NORM_EPS) * (1 + scale))


def lumina2_rope(mask: Tensor, grid_h: int, grid_w: int, *, axes_dim: list[int], theta: float) -> RopeTable:
    """RoPE angles of the [caption, image] sequence: caption token k at (k, 0, 0), image token (i, j) at
    (n_b, i, j) with n_b the number of valid tokens of caption b (mask (B, L) bool, valid tokens first). Angles in
    float64 where the device has it, stored as float32: cos, sin (B, L + h w, 1, head_dim / 2)."""
    b, length = mask.shape
    device = mask.device
    dtype = trig_dtype(device)
    caption = torch.arange(length, device=device, dtype=dtype)
    rows = torch.arange(grid_h, device=device, dtype=dtype).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=dtype).repeat(grid_h)
    valid = mask.sum(dim=1).to(dtype)  # (B,)
    zeros = torch.zeros(length, device=device, dtype=dtype)
    first = torch.cat([caption.expand(b, -1), valid[:, None].expand(-1, grid_h * grid_w)], dim=1)  # (B, S)
    others = [torch.cat([zeros, rows]), torch.cat([zeros, cols])]  # (S,) each
    parts = []
    for k, (pos, d) in enumerate(zip([first, *others], axes_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=dtype) / d)
        angles = pos[..., None] * freqs  # (B, S, d / 2) or (S, d / 2)
        parts.append(angles if k == 0 else angles.expand(b, -1, -1))
    angles = torch.cat(parts, dim=-1)[:, :, None, :]  # (B, S, 1, hd / 2)
    return RopeTable(torch.cos(angles).float(), torch.sin(angles).float())


def _rows(table: RopeTable, start: int, stop: int) -> RopeTable:
    return RopeTable(table.cos[:, start:stop], table.sin[:, start:stop])


class Lumina2(nn.Module):
    """Lumina-Image-2's transformer behind flowmatch's model call: ``model(x, t, cond) -> v``.

    x: (B, C, H, W) latents, t: (B,) with t = 1 noise, cond.hidden (B, L, context_dim) and cond.mask (B, L) with the
    valid tokens first -> velocity (B, C_out, H, W) = noise - data.
    """

    def __init__(self, cfg: MMDiTConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # How padded text is masked and whether the blocks are compiled: set from outside, models.parallelize.
        self.attention_kernel = "auto"
        self.blocks_compiled = False
        d, p = cfg.width, cfg.patch_size
        self.out_channels = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        kw = dict(device=device, dtype=dtype)
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d, **kw)
        # The release embeds 1 - t in [0, 1] itself, unscaled (time_scale 1).
        self.time_embed = TimestepEmbedder(cfg.time_freq_dim, min(d, TIME_WIDTH), scale=cfg.time_scale, **kw)
        self.context_norm = RmsNorm(cfg.context_dim, eps=cfg.norm_eps, **kw)
        self.context_embed = nn.Linear(cfg.context_dim, d, **kw)
        self.context_refiner = nn.ModuleList(Lumina2Block(cfg, modulated=False, **kw)
                                             for _ in range(cfg.refiner_layers))
        self.noise_refiner = nn.ModuleList(NoiseRefinerBlock(cfg, modulated=True, **kw)
                                           for _ in range(cfg.refiner_layers))
        self.layers = nn.ModuleList(Lumina2Block(cfg, modulated=True, **kw) for _ in range(cfg.depth))
        self.final = Lumina2FinalLayer(d, p * p * self.out_channels, **kw)
        if not any(param.is_meta or param.numel() == 0 for param in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform linears with zero biases, unit RMSNorm scales, N(0, 0.02) timestep MLP, and zeroed
        modulation (tanh gates at 0: every block starts as the identity) and final projection (the model outputs
        exactly zero). Call after ``to_empty`` from meta."""
        init_linears_and_norms(self)
        for linear in (self.time_embed.mlp.fc1, self.time_embed.mlp.fc2):
            nn.init.normal_(linear.weight, std=EMBEDDER_INIT_STD)
        for module in self.modules():
            if isinstance(module, AdaLNModulation):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def blocks(self) -> list[nn.Module]:
        """All transformer blocks in execution order (the units of checkpointing and compilation)."""
        return [*self.context_refiner, *self.noise_refiner, *self.layers]

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor]) -> None:
        check_latents_and_text(self.cfg, x, t, cond)
        if r is not None:
            raise ValueError("Lumina-Image-2 takes no interval input r (model.interval_embed is not supported)")
        if cond.reference or cond.extra:
            raise ValueError("Lumina-Image-2 takes no reference images and no extra inputs (cond.reference, "
                             f"cond.extra: {sorted(cond.extra)})")

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(x, t, cond, r)
        cfg = self.cfg
        b, _, height, width = x.shape
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        temb = self.time_embed(1 - t.float())  # (B, min(D, 1024)): the release's reversed time
        img = self.patch_embed(patchify(x, cfg.patch_size))  # (B, N, D)
        ctx = self.context_embed(self.context_norm(cond.hidden))  # (B, L, D)
        length = ctx.shape[1]
        rope = lumina2_rope(cond.mask, gh, gw, axes_dim=cfg.axes_dim, theta=cfg.rope_theta)
        cap_rope, img_rope = _rows(rope, 0, length), _rows(rope, length, rope.cos.shape[1])
        # With no padding (known on the host) no mask reaches attention, which keeps SDPA's flash kernels eligible.
        cap_mask = joint_mask = None
        if not cond.all_valid:
            # the kernel for padded text (flowmatch.models.key_padding): a boolean SDPA mask or a flex BlockMask
            flex = uses_flex(self.attention_kernel, device_type=x.device.type, compiled=self.blocks_compiled)
            cap_mask = key_padding_mask(cond.mask, cond.mask.shape[1], flex=flex)  # no valid token: SDPA gives 0
            keep = torch.cat([cond.mask, cond.mask.new_ones(b, img.shape[1])], dim=1)  # (B, L + N)
            joint_mask = key_padding_mask(keep, keep.shape[1], flex=flex)
        for block in self.context_refiner:
            ctx = block(ctx, cap_mask, cap_rope)
        for block in self.noise_refiner:
            img = block(img, None, img_rope, temb)
        seq = torch.cat([ctx, img], dim=1)  # (B, L + N, D)
        for block in self.layers:
            seq = block(seq, joint_mask, rope, temb)
        out = self.final(seq[:, length:], temb)  # (B, N, p * p * C_out)
        # The release predicts data - noise; flowmatch's velocity is noise - data.
        return -unpatchify(out, gh, gw, cfg.patch_size)
