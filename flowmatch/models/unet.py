"""The U-Net backbone (``model.kind: unet``): diffusers' ``UNet2DConditionModel`` behind flowmatch's model call
``model(x, t, cond)``, so the DDPM/latent-diffusion architecture trains, checkpoints, averages (EMA) and samples
through the same engine, pipeline and eval as the MMDiT.

The U-Net is diffusers' own, not written here: convolutional down/up blocks with cross-attention from the image
features to the text encoder's hidden states (``cond.hidden``, with ``cond.mask`` as the attention mask), and the
pooled text vector (``cond.pooled``) added to the timestep embedding through its ``class_embed_type="projection"``
embedding. The time input is ``time_scale * t`` like the MMDiT's, which on a VP path is DDPM's integer timestep
at t = k / 1000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from flowmatch.conditioning import Conditioning

if TYPE_CHECKING:
    from flowmatch.families.config import ModelConfig

__all__ = ["UNetBackbone", "UNetConfig"]


@dataclass
class UNetConfig:
    """The ``model.unet`` section: the U-Net's layout (used when ``model.kind: unet``); defaults are the digits size."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 32])
    """Channels of each resolution level; each level after the first halves the resolution."""
    layers_per_block: int = 1
    """Residual blocks per level (diffusers' layers_per_block)."""
    heads: int = 4
    """Attention heads of every cross-attention layer (diffusers calls this attention_head_dim)."""
    cross_attention: list[bool] = field(default_factory=lambda: [False, True])
    """Per level: whether it has cross-attention to the text (CrossAttnDownBlock2D) or not (DownBlock2D)."""
    norm_num_groups: int = 16
    """Groups of every GroupNorm; must divide every entry of block_out_channels."""

    def __post_init__(self) -> None:
        if not self.block_out_channels or len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(f"model.unet.cross_attention needs one entry per level of block_out_channels "
                             f"({len(self.block_out_channels)}); got {self.cross_attention}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"model.unet.norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"model.unet.block_out_channels={self.block_out_channels}")
        if self.layers_per_block < 1 or self.heads < 1:
            raise ValueError("model.unet.layers_per_block and model.unet.heads must be >= 1")

    @property
    def downsample(self) -> int:
        """Total downsampling factor: image sides must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)


class UNetBackbone(nn.Module):
    """``UNet2DConditionModel`` with flowmatch's call: forward(x (B, C, H, W), t (B,) in [0, 1], cond) -> (B, C', H, W).

    Built from the model section (``ModelConfig``): ``in_channels``/``out_channels``, ``context_dim`` (the
    cross-attention width), ``pooled_dim``, ``sample_size``, ``time_scale`` and the ``unet`` sub-section.
    """

    def __init__(self, cfg: "ModelConfig") -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel  # optional heavy dependency, loaded on use: U-Net runs only

        for name in ("in_channels", "context_dim", "pooled_dim"):
            if getattr(cfg, name) is None:
                raise ValueError(f"model.{name} is None; let the trainer fill it from the encoders")
        u = cfg.unet
        self.time_scale = cfg.time_scale
        self.unet = UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels or cfg.in_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention)),
            block_out_channels=tuple(u.block_out_channels),
            layers_per_block=u.layers_per_block,
            attention_head_dim=u.heads,
            norm_num_groups=u.norm_num_groups,
            cross_attention_dim=cfg.context_dim,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=cfg.pooled_dim,
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the output convolution, so the initial prediction is 0 (as in Dhariwal & Nichol's ADM U-Net); the
        other layers keep diffusers' initialisation from the constructor (seeded by the caller)."""
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        out = self.unet(
            x,                                        # (B, C, H, W)
            timestep=t * self.time_scale,             # (B,)
            encoder_hidden_states=cond.hidden,        # (B, L, context_dim)
            # (B, L) True = a real token; none without padding, which keeps SDPA's flash kernels eligible
            encoder_attention_mask=None if cond.all_valid else cond.mask,
            class_labels=cond.pooled,                 # (B, pooled_dim), added to the time embedding
        ).sample
        return out                                    # (B, C', H, W)
