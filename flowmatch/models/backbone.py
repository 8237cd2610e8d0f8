"""The one place a model section becomes a network: ``model.kind`` picks the MMDiT or the U-Net."""

from __future__ import annotations

from torch import nn

from flowmatch.errors import choice_error
from flowmatch.models.mmdit import MMDiT, MMDiTConfig
from flowmatch.models.unet import UNetBackbone

__all__ = ["MODEL_KINDS", "build_backbone"]

MODEL_KINDS = ("mmdit", "unet")


def build_backbone(cfg: MMDiTConfig, **kwargs) -> nn.Module:
    """``MMDiT(cfg, **kwargs)`` or, for ``model.kind: unet``, the diffusers U-Net behind the same call."""
    if cfg.kind == "mmdit":
        return MMDiT(cfg, **kwargs)
    if cfg.kind == "unet":
        return UNetBackbone(cfg)
    raise choice_error("model.kind", cfg.kind, MODEL_KINDS)
