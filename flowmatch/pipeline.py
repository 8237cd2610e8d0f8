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
    """The pipeline of a run directory (its newest intact checkpoint) or of one checkpoint directory.

    The recipe and weights files are verified against the checkpoint's manifest before they are used; from a run
    directory, damaged newer checkpoints are skipped with a warning, and a damaged checkpoint named explicitly
    raises :class:`~flowmatch.checkpoint.CheckpointError` naming the file.

    Args:
        path: ``RUN_DIR`` or ``RUN_DIR/checkpoints/<step>``.
        device: where to run (CUDA when available by default).
        ema: True for the EMA weights, False for the raw weights, None for the checkpoint's default (the weights
            validation found better, else the EMA when present), or the name of an EMA reconstructed by
            `flowmatch ema` (e.g. ``"sigma_rel-0.1"``, from ``RUN_DIR/ema/``).
    """
    from safetensors.torch import load_file

    from flowmatch.checkpoint import RECIPE_FILE, resolve_checkpoint, weights_file
    from flowmatch.config import recipe_from_yaml
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.models.backbone import build_backbone
    from flowmatch.posthoc import load_named_ema

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    named = isinstance(ema, str)  # a reconstructed EMA lives in RUN_DIR/ema/, not in the checkpoint
    ckpt = resolve_checkpoint(path, reads=lambda c: (RECIPE_FILE,) if named else (RECIPE_FILE, weights_file(c, ema)))
    recipe = recipe_from_yaml((ckpt / RECIPE_FILE).read_text())
    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=device)
    recipe.model = encoders.fill_model_config(recipe.model)
    model = build_backbone(recipe.model)
    model.load_state_dict(load_named_ema(ckpt, ema) if named else load_file(str(ckpt / weights_file(ckpt, ema))))
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, recipe, device=device)
