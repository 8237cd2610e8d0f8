"""The U-Net family (``model.family: unet``, written ``model.kind: unet`` before families): diffusers'
``UNet2DConditionModel`` behind flowmatch's model call (:mod:`flowmatch.models.unet`), trained from its random
init. Its FLOP count is measured, not derived: one meta-device forward under ``FlopCounterMode``."""

from __future__ import annotations

from typing import Any

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.families.spec import Capabilities, Family, LatentLayout
from flowmatch.families.unet.presets import PRESETS
from flowmatch.models.flops import counted_training_flops_per_step
from flowmatch.models.unet import UNetBackbone

#: The backbone this family builds, as ``model.kind`` names it.
KIND = "unet"


def build(cfg: Any, **kwargs: Any) -> UNetBackbone:
    """The U-Net of a recipe's model section (it has no meta-device construction: ``kwargs`` are not used)."""
    return UNetBackbone(cfg)


def claims(cfg) -> bool:
    """A section with ``model.kind: unet``."""
    return getattr(cfg, "kind", None) == KIND


def flops(cfg: Any, *, batch_size: int, latent_size: tuple[int, int], text_len: int, adapt=None) -> float:
    """Training FLOPs of one step, counted in one meta-device forward of a one-sample batch (every weight trained:
    the U-Net takes no adapters, ``adapt`` must be None)."""
    if adapt is not None:
        raise ValueError("the U-Net family takes no LoRA adapters: its FLOP count has no adapted form")
    height, width = latent_size
    with torch.device("meta"):
        shape_model = build(cfg)
        cond = Conditioning(torch.zeros(1, text_len, cfg.context_dim), torch.ones(1, text_len, dtype=torch.bool),
                            torch.zeros(1, cfg.pooled_dim))
        inputs = (torch.zeros(1, cfg.in_channels, height, width), torch.full((1,), 0.5), cond)
    return counted_training_flops_per_step(shape_model, inputs, batch_size=batch_size)


FAMILY = Family(
    name="unet",
    kind=KIND,
    summary="diffusers' UNet2DConditionModel (DDPM / latent diffusion), trained from a random init",
    presets=PRESETS,
    tiny="digits-unet",
    build=build,
    claims=claims,
    mismatch="model.kind: unet",
    capabilities=Capabilities(init_from=False, lora=False, interval_embed=False, block_transforms=False),
    time_scale=1000.0,  # DDPM's integer timestep at t = k / 1000 on a VP path
    flops=flops,
    latents=LatentLayout(channels=None, pack=1),
)
