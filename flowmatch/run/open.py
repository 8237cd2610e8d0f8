"""Opening a run: which checkpoint, its recipe (its relative paths resolved where the run was recorded), its
weights (raw, EMA or a reconstructed EMA), its model, and the base weights a LoRA run's adapters sit on.

Every file is verified against the checkpoint's manifest before it is used; from a run directory, damaged newer
checkpoints are skipped with a warning (:func:`flowmatch.checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from flowmatch.checkpoint import RECIPE_FILE, read_meta, resolve_checkpoint, weights_file
from flowmatch.config import Recipe, recipe_from_yaml
from flowmatch.errors import RecipeError
from flowmatch.families import build_backbone, family_of
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import read_config
from flowmatch.families.lora import apply_lora
from flowmatch.init_from import from_meta, load_weights
from flowmatch.models.lora import is_adapter
from flowmatch.models.mmdit import MMDiTConfig
from flowmatch.posthoc import load_named_ema
from flowmatch.run.paths import relocated, require

#: What each reader needs of a run's recorded assets: the pipeline loads the encoders.
ENCODER_SECTIONS = ("text_encoder", "text_encoders", "autoencoder")


@dataclass
class OpenedRun:
    """One checkpoint of a run, opened: its directory, its recipe and (when asked for) its weights."""

    checkpoint: Path
    """The verified checkpoint directory."""
    recipe: Recipe
    """Its resolved recipe, relative paths made absolute where the run was recorded."""
    weights: Optional[dict[str, torch.Tensor]] = None
    """The chosen weights (fp32, CPU), or None when only the recipe was asked for."""


def open_run(path: str | os.PathLike[str], *, ema: Optional[bool | str] = None, weights: bool = True,
             relocate: Optional[Mapping[str, str]] = None, needs: tuple[str, ...] = ()) -> OpenedRun:
    """Open a run directory (its newest intact checkpoint) or one checkpoint directory.

    Args:
        path: ``RUN_DIR`` or ``RUN_DIR/checkpoints/<step>``.
        ema: True for the EMA weights, False for the raw weights, None for the checkpoint's default (the weights
            validation found better, else the EMA when present), or the name of an EMA reconstructed by
            `flowmatch ema` (e.g. ``"sigma_rel-0.1"``, from ``RUN_DIR/ema/``).
        weights: also read the weights (verified together with the recipe, so a fallback picks a checkpoint where
            both are intact).
        relocate: recipe path key -> path, for assets moved since the run recorded them (:mod:`.paths`).
        needs: recipe sections whose recorded assets must exist (:data:`ENCODER_SECTIONS` for a pipeline); a gone
            one raises :class:`~flowmatch.run.paths.RunAssetMissing` naming the path and the override.
    """
    named = isinstance(ema, str)  # a reconstructed EMA lives in RUN_DIR/ema/, not in the checkpoint
    reads = (lambda c: (RECIPE_FILE,)) if named or not weights else (lambda c: (RECIPE_FILE, weights_file(c, ema)))
    ckpt = resolve_checkpoint(path, reads=reads)
    recipe = read_recipe(ckpt, relocate=relocate, needs=needs)
    if not weights:
        return OpenedRun(ckpt, recipe)
    state = load_named_ema(ckpt, ema) if named else load_file(str(ckpt / weights_file(ckpt, ema)))
    return OpenedRun(ckpt, recipe, state)


def read_recipe(ckpt: Path, *, relocate: Optional[Mapping[str, str]] = None, needs: tuple[str, ...] = ()) -> Recipe:
    """The recipe of a verified checkpoint directory, its recorded relative paths resolved (:mod:`.paths`)."""
    recipe = recipe_from_yaml((ckpt / RECIPE_FILE).read_text(), str(ckpt / RECIPE_FILE))
    recipe, missing = relocated(recipe, read_meta(ckpt).paths, relocate)
    require(missing, needs, where=str(ckpt))
    return recipe


def lora_base(ckpt: Path) -> dict[str, torch.Tensor]:
    """The base weights a LoRA checkpoint's meta.json records, their hash checked against the record."""
    base = from_meta(read_meta(ckpt).init_from)
    if base is None:
        raise ValueError(f"{ckpt} is a LoRA run but its meta.json records no base weights (init_from)")
    return load_weights(base, verify=True)


def checkpoint_model(ckpt: Path, model_cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model of a checkpoint (``model.kind``'s backbone) given its weights file's tensors: the whole model, or
    for a LoRA run (MMDiT only) the base weights its meta.json records (their hash checked) with the adapters
    applied through peft."""
    if model_cfg.lora is None:
        model = build_backbone(model_cfg)
        model.load_state_dict(weights)
        return model
    model = build_backbone(model_cfg, device="meta")
    model.load_state_dict(lora_base(ckpt), strict=True, assign=True)
    apply_lora(model, model_cfg.lora)
    loaded = model.load_state_dict(weights, strict=False)
    missing = [k for k in loaded.missing_keys if is_adapter(k)]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{ckpt}'s adapters do not fit its recipe's model.lora: missing {missing[:4]}, unexpected "
                         f"{loaded.unexpected_keys[:4]}")
    return model


def source_architecture(kind: str, path: Path) -> MMDiTConfig:
    """The architecture of the weights at a located ``model.init_from`` source
    (:func:`flowmatch.init_from.locate`), read without loading them: a run's from its recipe, others' from their
    config or safetensors header."""
    if kind != "checkpoint":
        return read_config(path)
    model = read_recipe(resolve_checkpoint(path, reads=lambda c: (RECIPE_FILE,))).model
    family = family_of(model)
    if not family.capabilities.init_from:
        raise RecipeError(f"model.init_from={str(path)!r} is a model.family: {family.name} run ({family.summary}), "
                          "whose weights no other model starts from: start from an sd3 or flux run or weights")
    if model.lora is not None:
        raise RecipeError(f"model.init_from={str(path)!r} is a LoRA run (its checkpoints hold adapters only): "
                          "merge them first with `flowmatch export RUN OUT --lora --merge` and start from OUT")
    return model.architecture()
