"""What the MMDiT families (:mod:`.sd3`, :mod:`.flux`) share: building the network from a model section, the
analytic FLOP count, and the test-sized blocks their tiny presets use."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from flowmatch.models.flops import training_flops_per_step
from flowmatch.models.mmdit import MMDiT

#: The backbone the MMDiT families build, as ``model.kind`` names it.
KIND = "mmdit"
#: SD3's and FLUX's time convention: the model embeds t * 1000 (diffusers' timestep is 1000 t).
TIME_SCALE = 1000.0
#: Test-sized blocks for the released layouts; encoder and latent sizes come from the test or the trainer.
TINY = dict(depth=2, num_heads=4, head_dim=16, in_channels=None, context_dim=None, pooled_dim=None)


def is_mmdit(cfg: Any) -> bool:
    """Whether a model section (or an MMDiTConfig, which has no kind) describes an MMDiT."""
    return getattr(cfg, "kind", KIND) == KIND


def build(cfg: Any, **kwargs: Any) -> MMDiT:
    """``MMDiT(cfg.architecture(), **kwargs)`` of a recipe's model section (an MMDiTConfig is used as it is)."""
    arch = cfg.architecture() if hasattr(cfg, "architecture") else cfg
    return MMDiT(arch, **kwargs)


def flops(cfg: Any, *, batch_size: int, latent_size: tuple[int, int], text_len: int,
          adapt: Optional[Callable[[MMDiT], object]] = None) -> float:
    """The analytic training FLOPs of one step (:func:`flowmatch.models.flops.training_flops_per_step`), sized on
    a meta-device model; ``adapt`` (e.g. injecting LoRA adapters: :func:`flowmatch.families.lora.training_flops`)
    changes it in place first."""
    with torch.device("meta"):
        shape_model = build(cfg)
        if adapt is not None:
            adapt(shape_model)
    return training_flops_per_step(shape_model, batch_size=batch_size, latent_size=latent_size,
                                   text_len=text_len).total
