"""The MMDiT velocity model (SD3: Esser et al. 2024, "Scaling Rectified Flow Transformers", sections 4 and B),
with the options that make the released SD3.5, FLUX.1 and Qwen-Image architectures: MMDiT-X blocks (a second,
image-only attention; SD3.5-medium), FLUX single-stream blocks, RoPE over 2 or 3 position axes in FLUX's or
Qwen-Image's MSRoPE layout, a guidance embedding (FLUX.1-dev), no pooled text vector and an RMS-normalised text
input (Qwen-Image), the modulation approximator in place of per-block modulation (Chroma), and FLUX.2's
modulation shared by all blocks, SwiGLU MLPs, bias-free linears and four-axis RoPE (:mod:`flowmatch.models.flux2`).
`flowmatch.families` names each released layout (its presets).

Time convention (flowmatch-wide): t = 0 is data, t = 1 is noise; the model predicts the velocity noise - x0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from flowmatch.conditioning import Conditioning
from flowmatch.models.approximator import ModulationApproximator, Modulations
from flowmatch.models.embeddings import (
    EMBEDDER_INIT_STD,
    ROPE_LAYOUTS,
    RopeTable,
    TimestepEmbedder,
    mlp_embedder,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)
from flowmatch.models.flux2 import SharedModulation
from flowmatch.models.key_padding import AttentionMask, key_padding_mask, uses_flex
from flowmatch.models.layers import AdaLNModulation, FinalLayer, JointBlock, SingleBlock, init_linears_and_norms
from flowmatch.models.mlp import RmsNorm
from flowmatch.models.mmdit_config import MMDiTConfig, check_latents_and_text


def _owned(x: Tensor) -> Tensor:
    """``x`` as a tensor of its own when it is a view (a linear layer's output on (B, S, F) inputs is one).

    Every block then receives inputs of one kind: a block compiled for dynamic sequence lengths guards on the base
    of an input view, so view inputs of the first block would need a graph of their own (one recompile more per
    block type and bucket change). The copy is one (B, S, D) pass, next to a block's many.
    """
    return x.clone() if x._base is not None else x


class MMDiT(nn.Module):
    """Multimodal diffusion transformer predicting rectified-flow velocities.

    forward(x (B, C, H, W), t (B,) in [0, 1], cond: Conditioning with hidden (B, L, context_dim),
    mask (B, L) bool, pooled (B, pooled_dim) and, with guidance_embed, extra["guidance"] (B,); no other extra
    inputs; up to ``references`` reference latents cond.reference, each (B, C, h_k, w_k); r (B,) <= t or None = t)
    -> velocity (B, C_out, H, W) of the target's tokens only: with interval_embed, the average velocity over
    [r, t] (``x_r = x_t - (t - r) u``); at r = t, and always without interval_embed, the instantaneous one.

    Reference tokens are patchified by the same ``patch_embed``, appended to the image stream after the target's,
    never noised, and modulated by the sample's t like every token (FLUX.1 Kontext: one modulation per sample).
    """

    def __init__(self, cfg: MMDiTConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.out_channels = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        kw = dict(device=device, dtype=dtype)
        block_kw = dict(qk_norm=cfg.qk_norm, eps=cfg.norm_eps, **kw)

        # A linear over patchified tokens rather than timm's `PatchEmbed`, a strided conv computing the same map:
        # the linear keeps the weight's name and (D, p * p * C) shape that existing checkpoints hold, and its
        # (p_row, p_col, C) feature order is the one the final layer produces for `unpatchify`.
        bias = cfg.bias
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d, bias=bias, **kw)
        given = cfg.modulation != "adaln"
        # Either one vector per sample (time + pooled text) that each block modulates from, or rows handed to the
        # blocks: the approximator's from the timestep (Chroma; no pooled text) or the shared linears' (FLUX.2).
        self.approximator = ModulationApproximator(
            cfg.depth, cfg.single_blocks, d, channels=cfg.approximator_channels, hidden=cfg.approximator_hidden,
            layers=cfg.approximator_layers, **kw) if cfg.modulation == "approximator" else None
        self.shared_mod = SharedModulation(d, cfg.depth, cfg.single_blocks, bias=bias, **kw
                                           ) if cfg.modulation == "shared" else None
        # Where the time scale applies: to t (SD3, FLUX) or to the sinusoid's angles (time_scale_last).
        self.time_input_scale = 1.0 if cfg.time_scale_last else cfg.time_scale
        self.time_embed = None if self.approximator is not None else TimestepEmbedder(
            cfg.time_freq_dim, d, scale=cfg.time_scale if cfg.time_scale_last else 1.0, bias=bias, **kw)
        self.guidance_embed = TimestepEmbedder(cfg.time_freq_dim, d, bias=bias, **kw) if cfg.guidance_embed else None
        self.interval_embed = TimestepEmbedder(cfg.time_freq_dim, d, bias=bias, **kw) if cfg.interval_embed else None
        self.pooled_embed = mlp_embedder(cfg.pooled_dim, d, bias=bias, **kw) if cfg.pooled_dim else None
        self.context_norm = RmsNorm(cfg.context_dim, eps=cfg.norm_eps, **kw) if cfg.context_norm else None
        self.context_embed = nn.Linear(cfg.context_dim, d, bias=bias, **kw)
        # Without single blocks the text stream of the last joint block is never read again (SD3).
        last_pre_only = cfg.single_blocks == 0 and not cfg.text_last_block
        block_kw.update(bias=bias, gated=cfg.mlp == "swiglu")
        self.joint_blocks = nn.ModuleList(
            JointBlock(d, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden,
                       context_pre_only=last_pre_only and i == cfg.depth - 1,
                       dual=i in cfg.dual_attention_layers, given_mod=given, **block_kw)
            for i in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleBlock(d, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden, given_mod=given, **block_kw)
            for _ in range(cfg.single_blocks)
        )
        # FLUX.2's final layer keeps its own adaLN linear; the approximator gives Chroma's its rows too.
        self.final = FinalLayer(d, p * p * self.out_channels, eps=cfg.norm_eps,
                                given_mod=self.approximator is not None, bias=bias, **kw)
        # How padded text is masked (flowmatch.models.key_padding.ATTENTION_KERNELS) and whether the blocks are
        # compiled (``auto`` picks FlexAttention then, on CUDA): set from outside, models.parallelize.
        self.attention_kernel = "auto"
        self.blocks_compiled = False
        # Parameters on the meta device, or already partitioned away (numel 0) by ZeRO-3's zero.Init, are
        # initialised by the caller once they are whole.
        if not any(param.is_meta or param.numel() == 0 for param in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """adaLN-Zero initialisation (DiT, Peebles & Xie 2023, section 3.2): Xavier-uniform linears with zero
        bias, unit QK-norm scales, N(0, 0.02) timestep, guidance and pooled-text MLPs, and zeroed modulation and final
        projection, so every block starts as the identity and the model outputs exactly zero. The interval
        embedder's last layer is zeroed too (:meth:`zero_embedder`). Call after `to_empty` from meta."""
        init_linears_and_norms(self)
        embedders = [] if self.approximator is not None else [self.time_embed.mlp]
        embedders += [self.pooled_embed] if self.pooled_embed is not None else []
        if self.approximator is not None:  # its last layer zero: every modulation row starts at zero (adaLN-Zero)
            embedders += [self.approximator.in_proj, *(layer.mlp for layer in self.approximator.layers)]
            nn.init.zeros_(self.approximator.out_proj.weight)
        if self.guidance_embed is not None:
            embedders.append(self.guidance_embed.mlp)
        if self.interval_embed is not None:
            embedders.append(self.interval_embed.mlp)
        for embedder in embedders:
            for linear in (embedder.fc1, embedder.fc2) if hasattr(embedder, "fc1") else (embedder,):
                nn.init.normal_(linear.weight, std=EMBEDDER_INIT_STD)
        if self.interval_embed is not None:
            self.zero_embedder("interval_embed")
        zeroed = [m.linear for m in self.modules() if isinstance(m, AdaLNModulation)] + [self.final.linear]
        if self.shared_mod is not None:
            zeroed += [self.shared_mod.img, self.shared_mod.txt, self.shared_mod.single]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    @torch.no_grad()
    def zero_embedder(self, name: str) -> None:
        """Zero the last layer of embedder ``name`` ("interval_embed" or "guidance_embed"): its output is 0 and the
        model computes what it did without it, until training moves it."""
        fc2 = getattr(self, name).mlp.fc2
        nn.init.zeros_(fc2.weight)
        if fc2.bias is not None:
            nn.init.zeros_(fc2.bias)

    def blocks(self) -> list[nn.Module]:
        """All transformer blocks in execution order (the units of checkpointing and compilation)."""
        return [*self.joint_blocks, *self.single_blocks]

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor]) -> None:
        cfg = self.cfg
        b = check_latents_and_text(cfg, x, t, cond)
        if r is not None and r.shape != (b,):
            raise ValueError(f"r must be ({b},) or None, got {tuple(r.shape)}")
        if self.pooled_embed is not None and cond.pooled.shape != (b, cfg.pooled_dim):
            raise ValueError(f"cond.pooled must be ({b}, {cfg.pooled_dim}), got {tuple(cond.pooled.shape)}")
        if len(cond.reference) > cfg.references:
            raise ValueError(f"cond carries {len(cond.reference)} reference image(s); this MMDiT takes at most "
                             f"{cfg.references} (model.references)")
        for k, ref in enumerate(cond.reference):
            if ref.shape[:2] != (b, cfg.in_channels) or ref.shape[2] % cfg.patch_size or ref.shape[3] % cfg.patch_size:
                raise ValueError(f"cond.reference[{k}] must be ({b}, {cfg.in_channels}, h, w) latents with h, w "
                                 f"divisible by patch_size={cfg.patch_size}, got {tuple(ref.shape)}")
        takes = {"guidance"} if cfg.guidance_embed else set()
        if set(cond.extra) - takes:
            raise ValueError(f"cond.extra has inputs this MMDiT does not take: {sorted(set(cond.extra) - takes)}; "
                             f"it takes {sorted(takes) or 'none'}")
        if cfg.guidance_embed:
            guidance = cond.extra.get("guidance")
            if guidance is None:
                raise ValueError("this MMDiT embeds a guidance value (guidance_embed, FLUX.1-dev): pass "
                                 "cond.extra['guidance'] (B,), e.g. 3.5")
            if guidance.shape != (b,):
                raise ValueError(f"cond.extra['guidance'] must be ({b},), got {tuple(guidance.shape)}")

    def _modulation(self, t: Tensor, cond: Conditioning, r: Optional[Tensor]) -> Modulations:
        """What each block modulates from: the approximator's rows, or the one vector (B, D) of the timestep,
        guidance, interval and pooled text that every block's own linear reads."""
        cfg = self.cfg
        if self.approximator is not None:
            return self.approximator(t.float() * cfg.time_scale)
        vec = self.time_embed(t.float() * self.time_input_scale)  # (B, D)
        if self.guidance_embed is not None:  # (time + guidance) + pooled: FLUX's order of the sums
            vec = vec + self.guidance_embed(cond.extra["guidance"].float() * cfg.time_scale)
        if self.interval_embed is not None:  # the interval t - r (MeanFlow's (t, t - r) inputs); r = None is r = t
            interval = t.float() - r.float() if r is not None else torch.zeros_like(t, dtype=torch.float32)
            vec = vec + self.interval_embed(interval * cfg.time_scale)
        if self.pooled_embed is not None:
            vec = vec + self.pooled_embed(cond.pooled)
        if self.shared_mod is not None:
            return self.shared_mod(vec)
        return Modulations(joint=[vec] * len(self.joint_blocks), single=[vec] * len(self.single_blocks), final=vec)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor] = None) -> Tensor:
        """Velocity at (x, t) given the caption conditioning (averaged over [r, t] with interval_embed); text tokens
        where cond.mask is False (padding or dropped tokens) are never attended to."""
        self._check_inputs(x, t, cond, r)
        cfg = self.cfg
        b, _, height, width = x.shape
        gh, gw = height // cfg.patch_size, width // cfg.patch_size

        img = self.patch_embed(patchify(x, cfg.patch_size))  # (B, N, D)
        n = img.shape[1]  # the target's tokens: the only ones whose velocity is returned
        if not cfg.rope:
            pos = sincos_pos_embed_2d(gh, gw, cfg.width, base_size=cfg.sample_size // cfg.patch_size,
                                      max_size=cfg.pos_embed_max_size, device=x.device)
            img = (img + pos).to(img.dtype)
        # references need RoPE (validate()); the sin-cos grid above is the target's alone
        ref_grids = [(r.shape[2] // cfg.patch_size, r.shape[3] // cfg.patch_size) for r in cond.reference]
        if cond.reference:  # clean reference tokens after the target's: (B, N + sum N_k, D)
            refs = [self.patch_embed(patchify(r.to(x.dtype), cfg.patch_size)) for r in cond.reference]
            img = torch.cat([img, *refs], dim=1)
        mods = self._modulation(t, cond, r)
        hidden = self.context_norm(cond.hidden) if self.context_norm is not None else cond.hidden
        ctx = self.context_embed(hidden)  # (B, L, D)
        img, ctx = _owned(img), _owned(ctx)

        image_len, text_len = img.shape[1], ctx.shape[1]
        # Image (and reference) keys are always visible; only the text keys are masked. With no padding (known on
        # the host) no mask reaches attention, which keeps SDPA's flash kernels eligible; with padding, one mask
        # per batch in the kernel's form (flowmatch.models.key_padding), a second for image-only queries.
        mask: AttentionMask = None
        image_query_mask: AttentionMask = None
        if not cond.all_valid:
            keep = torch.cat([cond.mask.new_ones(b, image_len), cond.mask], dim=1)  # (B, S)
            flex = uses_flex(self.attention_kernel, device_type=x.device.type, compiled=self.blocks_compiled)
            mask = key_padding_mask(keep, image_len + text_len, flex=flex)
            pre_only = any(block.context_pre_only for block in self.joint_blocks)
            image_query_mask = key_padding_mask(keep, image_len, flex=flex) if flex and pre_only else mask
        rope: Optional[RopeTable] = None
        if cfg.rope:
            rope = ROPE_LAYOUTS[cfg.rope_layout](gh, gw, text_len, head_dim=cfg.head_dim, axes_dim=cfg.axes_dim,
                                                 theta=cfg.rope_theta, device=x.device, references=ref_grids)

        for block, vec in zip(self.joint_blocks, mods.joint):
            img, ctx = block(img, ctx, vec, image_query_mask if block.context_pre_only else mask, rope)
        if len(self.single_blocks):
            seq = torch.cat([img, ctx], dim=1)  # (B, N + N_ref + L, D)
            for block, vec in zip(self.single_blocks, mods.single):
                seq = block(seq, vec, mask, rope)
            img = seq[:, :image_len]
        out = self.final(img[:, :n], mods.final)  # (B, N, p * p * C_out): the loss sees the target's tokens only
        return unpatchify(out, gh, gw, cfg.patch_size)
