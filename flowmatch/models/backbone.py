"""The one place a model section becomes a network: ``model.kind`` picks the MMDiT or the U-Net."""

from __future__ import annotations

from torch import nn

from flowmatch.errors import choice_error
from flowmatch.models.config import MODEL_KINDS, ModelConfig
from flowmatch.models.mmdit import MMDiT
from flowmatch.models.unet import UNetBackbone

__all__ = ["MODEL_KINDS", "build_backbone"]


def build_backbone(cfg: ModelConfig, **kwargs) -> nn.Module:
    """``MMDiT(cfg.architecture(), **kwargs)`` or, for ``model.kind: unet``, the diffusers U-Net behind the same
    call."""
    if cfg.kind == "mmdit":
        return MMDiT(cfg.architecture(), **kwargs)
    if cfg.kind == "unet":
        return UNetBackbone(cfg)
    raise choice_error("model.kind", cfg.kind, MODEL_KINDS)
