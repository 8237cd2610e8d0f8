"""Lumina-Image-2's training FLOPs per step: 6 x parameters x the tokens each weight sees (forward 2, backward 4;
4 for a frozen weight, LoRA's base;
as :mod:`flowmatch.models.flops` counts the MMDiT), plus attention. Context refiners see the L caption tokens, noise
refiners and the patch embedding and final projection the N image tokens, joint blocks all L + N; the time MLP and
every modulation run once per sample; RMSNorm scales are elementwise and not counted. Attention adds 12 x B x
queries x keys x (query heads x head width) per block; grouped key/value heads are repeated, not multiplied."""

from __future__ import annotations

from typing import Any

import torch

from flowmatch.models.flops import TRAIN_FLOPS_PER_ATTENTION_ENTRY, per_weight
from flowmatch.models.lumina2 import Lumina2


def _matmul_params(module: torch.nn.Module, per_sample: bool = False) -> int:
    """Training FLOPs per token of ``module``'s linears (6 per trained weight, 4 per frozen one: LoRA's base):
    those outside modulation (``mod``) or, with ``per_sample``, only those in it."""
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and (name.startswith("mod.") or ".mod." in name) == per_sample:
            total += sum(per_weight(p) * p.numel() for p in sub.parameters())
    return total


def flops(cfg: Any, *, batch_size: int, latent_size: tuple[int, int], text_len: int, adapt=None) -> float:
    """Training FLOPs of one step of ``batch_size`` samples of ``latent_size`` (H, W) latents and ``text_len``
    caption tokens, sized on a meta-device model; ``adapt`` (LoRA: :func:`flowmatch.families.lora.training_flops`)
    changes it in place first."""
    arch = cfg.architecture() if hasattr(cfg, "architecture") else cfg
    with torch.device("meta"):
        model = Lumina2(arch)
        if adapt is not None:
            adapt(model)
    height, width = latent_size
    n_img = (height // arch.patch_size) * (width // arch.patch_size)
    seq = n_img + text_len
    image = _matmul_params(model.patch_embed) + _matmul_params(model.final) + sum(
        _matmul_params(b) for b in model.noise_refiner)
    text = _matmul_params(model.context_embed) + sum(_matmul_params(b) for b in model.context_refiner)
    joint = sum(_matmul_params(b) for b in model.layers)
    sample = _matmul_params(model.time_embed) + sum(  # the time MLP and the modulations
        _matmul_params(b, per_sample=True) for b in model.blocks())
    sample += _matmul_params(model.final, per_sample=True)
    tokens = image * n_img + text * text_len + joint * seq + sample
    entries = len(model.context_refiner) * text_len ** 2 + len(model.noise_refiner) * n_img ** 2
    entries += len(model.layers) * seq ** 2
    return float(batch_size * tokens
                 + TRAIN_FLOPS_PER_ATTENTION_ENTRY * batch_size * entries * arch.width)
