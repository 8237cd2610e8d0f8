"""The Z-Image transformer (Tongyi-MAI's Z-Image; diffusers' ZImageTransformer2DModel): one stream of
single-stream blocks over [image, text] tokens, after two refiners that see each modality alone: a noise refiner
over the image tokens (modulated by the time) and a context refiner over the text tokens (unmodulated).

Its blocks are sandwich-normed (an RMSNorm before and after attention and the SwiGLU MLP), modulated by
``scale`` and ``tanh(gate)`` only (no shift) from a 256-wide time embedding, with QK-norm and 3-axis RoPE over
position ids. Each sample's text is padded to a multiple of :data:`SEQ_MULTIPLE` tokens with a learned pad token
that attention sees, and so is the image; the image's first RoPE axis starts after its own sample's padded text,
so a batch of different caption lengths has per-sample positions. flowmatch's padded text (``Conditioning``:
(B, L) with a mask) gives the same result as diffusers' per-sample lists: tokens past a sample's padded length
are masked keys, which no valid token reads.

Time: the released network embeds ``1 - t`` and predicts ``x0 - noise``; :class:`ZImage` takes flowmatch's t and
returns flowmatch's velocity (t = 0 data, t = 1 noise, v = noise - x0), so nothing outside this module knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.conditioning import Conditioning
from flowmatch.models.embeddings import (
    EMBEDDER_INIT_STD,
    RopeTable,
    patchify,
    timestep_embedding,
    trig_dtype,
    unpatchify,
)
from flowmatch.models.key_padding import key_padding_mask, uses_flex
from flowmatch.models.layers import SelfAttention, init_linears_and_norms
from flowmatch.models.mlp import Mlp, RmsNorm, SwiGLU
from flowmatch.models.mmdit_config import MMDiTConfig, check_latents_and_text, check_sizes

#: MMDiTConfig.rope_layout of a Z-Image model: text on the first axis from 1, each sample's image after its padded
#: text (the MMDiT's validation refuses it: only this network places tokens so).
ROPE_LAYOUT = "zimage"
#: Every sample's image and text sequences are padded to a multiple of this many tokens (diffusers' SEQ_MULTI_OF).
SEQ_MULTIPLE = 32
#: Width of the time embedding every modulation reads (diffusers' ADALN_EMBED_DIM; min(width, this)).
MOD_DIM = 256
#: Hidden width of the time embedding's MLP (the release's TimestepEmbedder mid_size).
TIME_HIDDEN = 1024
#: The QK-norm's epsilon, fixed in the release whatever norm_eps says.
QK_NORM_EPS = 1e-5
#: The final layer's LayerNorm epsilon, fixed in the release.
FINAL_NORM_EPS = 1e-6


def mlp_hidden(width: int, ratio: float) -> int:
    """The SwiGLU's hidden width: ``width * ratio`` rounded as the release writes it (``int(dim / 3 * 8)``:
    10240 at width 3840, where ``int(3840 * 8 / 3)`` would give 10239)."""
    return int(round(width * ratio, 6))


def rope_from_ids(ids: Tensor, axes_dim: Sequence[int], theta: float) -> RopeTable:
    """RoPE angles of integer position ids: ids (B, S, A) -> a table of cos, sin (B, S, 1, sum(axes_dim) / 2).

    Axis a rotates ``axes_dim[a]`` channels at frequencies ``theta ** (-2i / d)``; the angles are computed in
    float64 (float32 where the device has none) and rounded to float32 before cos and sin, as the release's
    precomputed tables are.
    """
    dtype = trig_dtype(ids.device)
    parts = []
    for a, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=ids.device, dtype=dtype) / d)  # (d / 2,)
        parts.append((ids[..., a].to(dtype)[..., None] * freqs).float())  # (B, S, d / 2)
    angles = torch.cat(parts, dim=-1)[:, :, None, :]
    return RopeTable(torch.cos(angles), torch.sin(angles))


class ZImageBlock(nn.Module):
    """Sandwich-normed single-stream block: ``x + g_a * post_a(attn(pre_a(x) * s_a))`` then
    ``x + g_m * post_m(mlp(pre_m(x) * s_m))``, with (s_a, g_a, s_m, g_m) = (1 + ., tanh, 1 + ., tanh) of one
    linear of the time embedding when ``modulated`` (else 1).

    forward(x (B, S, D), mask (B, 1, 1, S) or None, rope, temb (B, MOD_DIM) or None) -> (B, S, D)
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden: int, *, modulated: bool, qk_norm: bool,
                 eps: float, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn = SelfAttention(dim, num_heads, head_dim, qk_norm=qk_norm, eps=QK_NORM_EPS, bias=False, **kw)
        self.mlp = SwiGLU(dim, hidden, **kw)
        self.norm_attn, self.norm_attn_out = RmsNorm(dim, eps=eps, **kw), RmsNorm(dim, eps=eps, **kw)
        self.norm_mlp, self.norm_mlp_out = RmsNorm(dim, eps=eps, **kw), RmsNorm(dim, eps=eps, **kw)
        self.modulation = nn.Linear(min(dim, MOD_DIM), 4 * dim, **kw) if modulated else None

    def forward(self, x: Tensor, mask: Optional[Tensor], rope: RopeTable, temb: Optional[Tensor] = None) -> Tensor:
        if self.modulation is None:
            x = x + self.norm_attn_out(self.attn(self.norm_attn(x), mask, rope))
            return x + self.norm_mlp_out(self.mlp(self.norm_mlp(x)))
        scale_a, gate_a, scale_m, gate_m = self.modulation(temb)[:, None].chunk(4, dim=-1)  # (B, 1, D) each
        x = x + gate_a.tanh() * self.norm_attn_out(self.attn(self.norm_attn(x) * (1.0 + scale_a), mask, rope))
        return x + gate_m.tanh() * self.norm_mlp_out(self.mlp(self.norm_mlp(x) * (1.0 + scale_m)))


class FinalLayer(nn.Module):
    """Parameter-free LayerNorm scaled by ``1 + linear(silu(temb))``, then a linear to patch pixels:
    (B, N, D) -> (B, N, out_features)."""

    def __init__(self, dim: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.modulation = nn.Linear(min(dim, MOD_DIM), dim, **kw)
        self.linear = nn.Linear(dim, out_features, **kw)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale = 1.0 + self.modulation(F.silu(temb))[:, None]  # (B, 1, D)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=FINAL_NORM_EPS) * scale)


def validate(cfg: MMDiTConfig) -> None:
    """ValueError naming the first MMDiTConfig field a Z-Image model cannot have."""
    check_sizes(cfg, ("in_channels", "context_dim"),
                ("patch_size", "depth", "num_heads", "head_dim", "time_freq_dim", "in_channels", "context_dim"))
    if cfg.refiner_layers < 0 or cfg.time_freq_dim % 2:
        raise ValueError(f"Z-Image needs refiner_layers >= 0 and an even time_freq_dim, got {cfg.refiner_layers} "
                         f"and {cfg.time_freq_dim}")
    if len(cfg.axes_dim) != 3 or sum(cfg.axes_dim) != cfg.head_dim or any(d <= 0 or d % 2 for d in cfg.axes_dim):
        raise ValueError(f"Z-Image rotates every head channel over three axes: rope_axes_dim={cfg.rope_axes_dim} "
                         f"must be three positive even sizes summing to head_dim={cfg.head_dim}")
    extras = {n: getattr(cfg, n) for n in ("pooled_dim", "guidance_embed", "interval_embed", "references",
                                           "dual_attention_layers", "single_blocks") if getattr(cfg, n)}
    if extras or cfg.modulation != "adaln" or not cfg.rope or cfg.rope_layout != ROPE_LAYOUT:
        raise ValueError(f"Z-Image takes text states alone (no pooled vector, guidance, interval, references, "
                         f"MMDiT-X or single blocks), modulates its own blocks and uses RoPE in its layout "
                         f"({ROPE_LAYOUT}); this config has "
                         f"{extras or dict(modulation=cfg.modulation, rope=cfg.rope, rope_layout=cfg.rope_layout)}")


def padded_length(n, multiple: int = SEQ_MULTIPLE):
    """``n`` tokens padded to a multiple of SEQ_MULTIPLE (an int, or an integer tensor elementwise)."""
    return (n + multiple - 1) // multiple * multiple


class ZImage(nn.Module):
    """The Z-Image velocity model.

    forward(x (B, C, H, W), t (B,) in [0, 1] (t = 1 noise), cond: Conditioning with hidden (B, L, context_dim) and
    mask (B, L) bool; no pooled vector, no extra inputs) -> velocity noise - x0, (B, C, H, W).

    Reads the MMDiTConfig fields in_channels, patch_size, depth (main blocks), refiner_layers, num_heads, head_dim,
    mlp_ratio, context_dim, qk_norm, norm_eps, time_freq_dim, time_scale, rope_theta and rope_axes_dim.
    """

    def __init__(self, cfg: MMDiTConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        # How padded text is masked and whether the blocks are compiled: set from outside, models.parallelize.
        self.attention_kernel = "auto"
        self.blocks_compiled = False
        d, p = cfg.width, cfg.patch_size
        self.out_channels = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        kw = dict(device=device, dtype=dtype)
        block_kw = dict(qk_norm=cfg.qk_norm, eps=cfg.norm_eps, **kw)
        heads, hidden = (cfg.num_heads, cfg.head_dim), mlp_hidden(d, cfg.mlp_ratio)

        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d, **kw)
        self.time_embed = Mlp(cfg.time_freq_dim, TIME_HIDDEN, min(d, MOD_DIM), act_layer=nn.SiLU, **kw)
        self.context_norm = RmsNorm(cfg.context_dim, eps=cfg.norm_eps, **kw)
        self.context_embed = nn.Linear(cfg.context_dim, d, **kw)
        # The learned tokens that pad each sample's image and text to a multiple of SEQ_MULTIPLE.
        self.image_pad = nn.Parameter(torch.zeros(1, d, **kw))
        self.text_pad = nn.Parameter(torch.zeros(1, d, **kw))
        self.noise_refiner = nn.ModuleList(ZImageBlock(d, *heads, hidden, modulated=True, **block_kw)
                                           for _ in range(cfg.refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(d, *heads, hidden, modulated=False, **block_kw)
                                             for _ in range(cfg.refiner_layers))
        self.layers = nn.ModuleList(ZImageBlock(d, *heads, hidden, modulated=True, **block_kw)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(d, p * p * self.out_channels, **kw)
        if not any(param.is_meta or param.numel() == 0 for param in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """adaLN-Zero initialisation (DiT, Peebles & Xie 2023): Xavier-uniform linears with zero bias, unit norm
        scales, an N(0, 0.02) time MLP and zero pad tokens, and zeroed modulation and final projection, so every
        modulated block starts with closed gates and the model outputs exactly zero. Call after ``to_empty``."""
        init_linears_and_norms(self)
        for linear in (self.time_embed.fc1, self.time_embed.fc2):
            nn.init.normal_(linear.weight, std=EMBEDDER_INIT_STD)
        for linear in [b.modulation for b in self.blocks() if b.modulation is not None] + [
                self.final.modulation, self.final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.image_pad)
        nn.init.zeros_(self.text_pad)

    def blocks(self) -> list[nn.Module]:
        """All transformer blocks in execution order (the units of checkpointing and compilation)."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Conditioning) -> None:
        check_latents_and_text(self.cfg, x, t, cond)
        if cond.extra or cond.reference:
            raise ValueError("Z-Image takes text and the noisy latents only: cond.extra and cond.reference must be "
                             f"empty, got extra {sorted(cond.extra)} and {len(cond.reference)} reference image(s)")

    def _text(self, cond: Conditioning) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """The embedded text (B, Lc, D) over Lc = L rounded up to SEQ_MULTIPLE, each sample's valid tokens first,
        then its pad tokens up to its own multiple (text_pad), then masked slots; the key mask (B, Lc) (None when
        no token is padding: every sample then has Lc tokens) and each sample's padded length (B,)."""
        hidden, b, length = cond.hidden, cond.hidden.shape[0], cond.hidden.shape[1]
        lc = padded_length(length)
        if cond.all_valid:
            lengths = torch.full((b,), length, device=hidden.device)
        else:  # valid tokens first, in their order: diffusers' pipeline passes each sample's valid tokens alone
            order = torch.argsort((~cond.mask).to(torch.uint8), dim=1, stable=True)
            hidden = hidden.gather(1, order[..., None].expand_as(hidden))
            lengths = cond.mask.sum(1)
        ctx = self.context_embed(self.context_norm(hidden))  # (B, L, D)
        ctx = F.pad(ctx, (0, 0, 0, lc - length))  # (B, Lc, D)
        slot = torch.arange(lc, device=ctx.device)
        padded = padded_length(lengths)  # (B,)
        ctx = torch.where((slot >= lengths[:, None])[..., None], self.text_pad.to(ctx.dtype), ctx)
        keys = None if cond.all_valid else slot < padded[:, None]
        return ctx, keys, padded

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Velocity noise - x0 at (x, t); masked text tokens are never attended to."""
        self._check_inputs(x, t, cond)
        cfg = self.cfg
        b, _, height, width = x.shape
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        n = gh * gw
        n_pad = padded_length(n)
        # The released network's time runs the other way: it embeds 1 - t.
        temb = self.time_embed(timestep_embedding((1.0 - t.float()) * cfg.time_scale, cfg.time_freq_dim)
                               .to(self.time_embed.fc1.weight.dtype))  # (B, MOD_DIM)

        img = self.patch_embed(patchify(x, cfg.patch_size))  # (B, N, D)
        img = torch.cat([img, self.image_pad.to(img.dtype).expand(b, n_pad - n, -1)], dim=1)  # (B, Npad, D)
        ctx, text_keys, text_len = self._text(cond)  # (B, Lc, D), (B, Lc) or None, (B,)
        lc = ctx.shape[1]

        # Position ids (axis 0, row, column): text (1 + k, 0, 0); image (its sample's padded text + 1, i, j),
        # image padding (0, 0, 0).
        ids_txt = torch.zeros(b, lc, 3, dtype=torch.long, device=x.device)
        ids_txt[..., 0] = torch.arange(1, lc + 1, device=x.device)
        rows, cols = (a.reshape(1, n).expand(b, n) for a in torch.meshgrid(
            torch.arange(gh, device=x.device), torch.arange(gw, device=x.device), indexing="ij"))
        ids_img = torch.stack([(text_len[:, None] + 1).expand(b, n), rows, cols], dim=-1)  # (B, N, 3)
        ids_img = F.pad(ids_img, (0, 0, 0, n_pad - n))  # (B, Npad, 3)
        rope_img = rope_from_ids(ids_img, cfg.axes_dim, cfg.rope_theta)
        rope_txt = rope_from_ids(ids_txt, cfg.axes_dim, cfg.rope_theta)

        for block in self.noise_refiner:  # every sample's image has Npad tokens: no mask
            img = block(img, None, rope_img, temb)
        # The kernel for padded text (flowmatch.models.key_padding): a boolean SDPA mask or a flex BlockMask.
        flex = uses_flex(self.attention_kernel, device_type=x.device.type, compiled=self.blocks_compiled)
        txt_mask = None if text_keys is None else key_padding_mask(text_keys, lc, flex=flex)  # (B, 1, 1, Lc)
        for block in self.context_refiner:
            ctx = block(ctx, txt_mask, rope_txt)

        seq = torch.cat([img, ctx], dim=1)  # (B, Npad + Lc, D)
        rope = RopeTable(torch.cat([rope_img.cos, rope_txt.cos], dim=1), torch.cat([rope_img.sin, rope_txt.sin], 1))
        mask = None
        if text_keys is not None:
            keep = torch.cat([text_keys.new_ones(b, n_pad), text_keys], dim=1)  # (B, S)
            mask = key_padding_mask(keep, keep.shape[1], flex=flex)
        for block in self.layers:
            seq = block(seq, mask, rope, temb)
        out = self.final(seq[:, :n], temb)  # (B, N, p * p * C_out)
        # The released network predicts x0 - noise: flowmatch's velocity is its negation.
        return -unpatchify(out, gh, gw, cfg.patch_size)
