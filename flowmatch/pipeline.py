"""A ready :class:`~flowmatch.sampling.Pipeline` from a run directory or one checkpoint: the last stage of the data
flow (checkpoint -> pipeline). Generation itself lives in :mod:`flowmatch.sampling.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from flowmatch.sampling.generate import Pipeline

__all__ = ["Pipeline", "load_pipeline"]


def load_pipeline(path: str | Path, *, device: Optional[torch.device | str] = None,
                  ema: Optional[bool | str] = None) -> Pipeline:
    """The pipeline of a run directory (its newest checkpoint) or of one checkpoint directory.

    Args:
        path: ``RUN_DIR`` or ``RUN_DIR/checkpoints/<step>``.
        device: where to run (CUDA when available by default).
        ema: True for the EMA weights, False for the raw weights, None for the checkpoint's default (the weights
            validation found better, else the EMA when present), or the name of an EMA reconstructed by
            `flowmatch ema` (e.g. ``"sigma_rel-0.1"``, from ``RUN_DIR/ema/``).
    """
    from flowmatch.checkpoint import load_recipe_yaml, load_weights, resolve_checkpoint
    from flowmatch.config import recipe_from_yaml
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.models.mmdit import MMDiT
    from flowmatch.posthoc import load_named_ema

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = resolve_checkpoint(path)
    recipe = recipe_from_yaml(load_recipe_yaml(ckpt))
    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=device)
    recipe.model = encoders.fill_model_config(recipe.model)
    model = MMDiT(recipe.model)
    model.load_state_dict(load_named_ema(ckpt, ema) if isinstance(ema, str) else load_weights(ckpt, ema=ema))
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, recipe, device=device)
