"""The transformer architecture config (MMDiTConfig) that the MMDiT, Z-Image and Lumina-Image-2 models read,
its allowed values and the checks of it: the config's own consistency (`MMDiTConfig.validate`), the sizes a model
needs filled in (`check_sizes`), and the latents and text a model is called with (`check_latents_and_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.models.embeddings import ROPE_AXES, ROPE_LAYOUTS

#: RoPE layouts whose positions depend on each caption's length, computed by their own backbone (Lumina-Image-2's
#: captions-first sequence, flowmatch.models.lumina2), not by the MMDiT's position tables.
SEQUENCE_ROPE_LAYOUTS = ("lumina2",)  # flowmatch.models.lumina2.ROPE_LAYOUT
#: Where the blocks' modulation comes from (MMDiTConfig.modulation).
MODULATIONS = ("adaln", "approximator", "shared")
#: The MLPs' form (MMDiTConfig.mlp).
MLPS = ("gelu", "swiglu")


@dataclass
class MMDiTConfig:
    """Architecture of an MMDiT (Z-Image and Lumina-Image-2 read the fields they use). Defaults are SD3-medium's
    layout with the encoder-dependent sizes left open."""

    preset: str = "custom"
    """Name of the preset these values started from ("custom" when built field by field)."""
    in_channels: Optional[int] = None
    """Channels of the input latents/pixels; None = filled in from the autoencoder by the trainer."""
    out_channels: Optional[int] = None
    """Channels of the predicted velocity; None = in_channels."""
    patch_size: int = 2
    """Side of the square patches that become tokens."""
    depth: int = 24
    """Number of joint (two-stream) blocks."""
    num_heads: int = 24
    """Attention heads; the model width is num_heads * head_dim."""
    head_dim: int = 64
    """Channels per attention head."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the model width."""
    context_dim: Optional[int] = None
    """Width of the text encoder's token embeddings; None = filled in from the text encoder."""
    pooled_dim: Optional[int] = None
    """Width of the pooled text vector; 0 = the model takes none (Qwen-Image); None = filled in from the text
    encoder."""
    context_norm: bool = False
    """RMS-normalise the text encoder's states, with a learned scale, before projecting them (Qwen-Image's
    txt_norm: a decoder LLM's last hidden states are not normalised)."""
    sample_size: int = 128
    """Base latent side the sin-cos position grid is scaled to (diffusers' sample_size)."""
    pos_embed_max_size: int = 192
    """Side, in tokens, of the sin-cos position grid that is cropped for each input size."""
    qk_norm: bool = True
    """RMS-normalise queries and keys per head (SD3 paper, section 5.3.2)."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm and RMSNorm."""
    time_freq_dim: int = 256
    """Channels of the sinusoidal timestep embedding."""
    time_scale: float = 1000.0
    """The model embeds t * time_scale (SD3/FLUX; diffusers takes timestep = t * 1000)."""
    time_scale_last: bool = False
    """Apply time_scale to the timestep sinusoid's angles (t * f_i) * time_scale rather than to t (Qwen-Image's
    Timesteps(scale=1000)); the same in exact arithmetic, not in float32."""
    single_blocks: int = 0
    """FLUX-style single-stream blocks after the joint ones (0 = SD3: last joint block is context-pre-only)."""
    rope: bool = False
    """Use RoPE in attention instead of the absolute sin-cos position embedding (FLUX)."""
    rope_theta: float = 10000.0
    """RoPE base period."""
    rope_axes_dim: Optional[list[int]] = None
    """Head channels rotated per position axis: (row, column), or FLUX's (image index, row, column) whose first
    axis is always 0 here; None = half of head_dim each for row and column."""
    rope_layout: str = "flux"
    """Where tokens sit on the RoPE axes: flux (image rows and columns from 0, text at 0) | msrope (Qwen-Image:
    three axes, the image grid centred on 0, text on the diagonal after it); see flowmatch.models.embeddings |
    zimage (text on the first axis from 1, the image after it: flowmatch.models.zimage, not an MMDiT's)."""
    dual_attention_layers: list[int] = field(default_factory=list)
    """Indices of the joint blocks whose image stream has MMDiT-X's second, image-only attention (SD3.5-medium)."""
    text_last_block: bool = False
    """Keep the text stream's attention output and MLP in the last joint block when there are no single blocks
    (Qwen-Image's weights have them, though nothing reads their output); False = SD3's context-pre-only block."""
    guidance_embed: bool = False
    """Embed a guidance value, cond.extra["guidance"] (B,) times time_scale, like the timestep (FLUX.1-dev)."""
    references: int = 0
    """Reference images (clean latents, cond.reference) a sample may carry: their tokens join the image stream
    with RoPE image index 1, 2, ... and the velocity is predicted for the target's tokens only (FLUX.1 Kontext: 1;
    0 = a text-to-image model)."""
    modulation: str = "adaln"
    """Where the blocks' adaLN modulation comes from: adaln (each block's own linear of the timestep + pooled-text
    vector: SD3, FLUX) | approximator (one MLP of the timestep for every block, no pooled text: Chroma) | shared
    (one linear per stream type of the time + guidance vector, its output given to every block: FLUX.2)."""
    approximator_channels: int = 64
    """modulation: approximator: input channels per modulation row (time, guidance and row-index sinusoids)."""
    approximator_hidden: int = 5120
    """modulation: approximator: the approximator MLP's width."""
    approximator_layers: int = 5
    """modulation: approximator: its residual layers."""
    interval_embed: bool = False
    """Embed the interval t - r of a second time r <= t like the timestep (few-step models: MeanFlow, shortcut);
    its last layer starts at zero, so a flow checkpoint loaded into it gives the same outputs."""
    kv_heads: Optional[int] = None
    """Key/value heads of grouped-query attention (Lumina-Image-2); None = num_heads."""
    refiner_layers: int = 0
    """Refiner blocks that see one modality alone before the joint sequence: that many over the image tokens and
    as many over the text tokens (Z-Image: 2, flowmatch.models.zimage; Lumina-Image-2, flowmatch.models.lumina2).
    The MMDiT reads none."""
    ffn_multiple_of: int = 1
    """The SwiGLU hidden width int(mlp_ratio * width) is rounded up to a multiple of this (Lumina-Image-2's
    multiple_of)."""
    bias: bool = True
    """Linear layers carry biases (False: none has one, FLUX.2)."""
    mlp: str = "gelu"
    """The MLPs: gelu (fc1, tanh-GELU, fc2: SD3, FLUX.1) | swiglu (fc1 to twice the hidden width, its halves
    gated as silu(a) * b, fc2: FLUX.2)."""

    @property
    def width(self) -> int:
        """Model width D = num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of every MLP."""
        return int(self.width * self.mlp_ratio)

    @property
    def takes_pooled(self) -> bool:
        """Whether the model reads the pooled text vector (pooled_dim 0: none, as with the approximator)."""
        return self.pooled_dim != 0

    @property
    def axes_dim(self) -> list[int]:
        """RoPE channels per position axis, resolved from rope_axes_dim."""
        if self.rope_axes_dim is not None:
            return list(self.rope_axes_dim)
        return [self.head_dim // 2, self.head_dim // 2]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.modulation not in MODULATIONS:
            raise ValueError(f"MMDiTConfig.modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"MMDiTConfig.mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.modulation == "shared" and (self.dual_attention_layers or self.single_blocks < 1):
            raise ValueError("MMDiTConfig.modulation=shared (FLUX.2) gives joint and single blocks one modulation "
                             "each: it takes single blocks and no dual_attention_layers")
        given = self.modulation == "approximator"
        if given:
            extras = [n for n in ("guidance_embed", "interval_embed", "references", "dual_attention_layers")
                      if getattr(self, n)]
            if extras or self.single_blocks < 1:
                raise ValueError(f"MMDiTConfig.modulation=approximator (Chroma) takes single blocks and none of "
                                 f"{extras or ['single_blocks=0']}: its modulation rows cover the timestep alone")
            if self.pooled_dim != 0:
                raise ValueError(f"MMDiTConfig.modulation=approximator (Chroma) takes no pooled text vector: set "
                                 f"pooled_dim to 0, got {self.pooled_dim}")
            for name in ("approximator_channels", "approximator_hidden", "approximator_layers"):
                if getattr(self, name) <= 0 or (name == "approximator_channels" and getattr(self, name) % 4):
                    raise ValueError(f"MMDiTConfig.{name} must be positive (channels divisible by 4), got "
                                     f"{getattr(self, name)}")
        check_sizes(self, ("in_channels", "context_dim", "pooled_dim"),
                    ("patch_size", "depth", "num_heads", "head_dim", "sample_size", "pos_embed_max_size",
                     "time_freq_dim", "in_channels", "context_dim"))
        if self.pooled_dim < 0:
            raise ValueError(f"MMDiTConfig.pooled_dim must be >= 0 (0: no pooled vector), got {self.pooled_dim}")
        if self.references < 0:
            raise ValueError(f"MMDiTConfig.references must be >= 0, got {self.references}")
        if self.references and not (self.rope and len(self.axes_dim) == 3):
            raise ValueError(f"MMDiTConfig.references={self.references} needs rope with three rope_axes_dim (image "
                             "index, rows, columns): reference tokens are told apart by the image index")
        if self.single_blocks < 0:
            raise ValueError(f"MMDiTConfig.single_blocks must be >= 0, got {self.single_blocks}")
        if self.time_freq_dim % 2:
            raise ValueError(f"MMDiTConfig.time_freq_dim must be even, got {self.time_freq_dim}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad or len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise ValueError(f"MMDiTConfig.dual_attention_layers={self.dual_attention_layers} must be distinct block "
                             f"indices in [0, depth={self.depth})")
        if self.single_blocks == 0 and self.depth - 1 in self.dual_attention_layers:
            raise ValueError("MMDiTConfig.dual_attention_layers cannot include the last joint block when there are "
                             "no single blocks: its text stream is context-pre-only")
        if self.rope_layout not in (*ROPE_LAYOUTS, *SEQUENCE_ROPE_LAYOUTS):
            raise ValueError(f"MMDiTConfig.rope_layout={self.rope_layout!r} must be one of "
                             f"{sorted((*ROPE_LAYOUTS, *SEQUENCE_ROPE_LAYOUTS))}")
        if self.rope_layout == "msrope" and (not self.rope or len(self.axes_dim) != 3):
            raise ValueError("MMDiTConfig.rope_layout=msrope needs rope: true and three rope_axes_dim (frame, "
                             f"rows, columns), got rope={self.rope}, rope_axes_dim={self.rope_axes_dim}")
        if self.rope:
            axes, counts = self.axes_dim, ROPE_AXES[self.rope_layout]
            if len(axes) not in counts or any(d <= 0 or d % 2 for d in axes) or sum(axes) > self.head_dim:
                raise ValueError(
                    f"MMDiTConfig.rope_axes_dim={self.rope_axes_dim} must be {' or '.join(map(str, counts))} positive "
                    f"even sizes summing to at most head_dim={self.head_dim} for rope_layout {self.rope_layout} "
                    "(flux: rows, columns or image index, rows, columns; msrope: frame, rows, columns; flux2: time, "
                    "rows, columns, sequence)"
                )
        elif self.width % 4:
            raise ValueError(
                f"the sin-cos position embedding needs num_heads * head_dim divisible by 4, got {self.width}"
            )


def check_sizes(cfg: MMDiTConfig, filled: Sequence[str], positive: Sequence[str]) -> None:
    """ValueError naming the first field of ``filled`` still None (the trainer fills in_channels from the
    autoencoder and the text widths from the text encoder), then the first of ``positive`` that is not positive."""
    for name in filled:
        if getattr(cfg, name) is None:
            raise ValueError(
                f"MMDiTConfig.{name} is None; set it, or let the trainer fill it from the "
                f"{'autoencoder' if name == 'in_channels' else 'text encoder'} before building the model"
            )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"MMDiTConfig.{name} must be positive, got {getattr(cfg, name)}")


def check_latents_and_text(cfg: MMDiTConfig, x: Tensor, t: Tensor, cond: Conditioning) -> int:
    """ValueError naming the input whose shape does not fit ``cfg``: latents x (B, in_channels, H, W) with sides
    divisible by the patch size, t (B,), text cond.hidden (B, L, context_dim) with a bool mask (B, L). Returns B."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={cfg.patch_size}; pad or resize")
    if t.shape != (b,):
        raise ValueError(f"t must be ({b},), got {tuple(t.shape)}")
    hidden, mask = cond.hidden, cond.mask
    if hidden.ndim != 3 or hidden.shape[0] != b or hidden.shape[2] != cfg.context_dim:
        raise ValueError(f"cond.hidden must be ({b}, L, {cfg.context_dim}), got {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"cond.mask must be bool {tuple(hidden.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    return b
