"""A ready :class:`~flowmatch.sampling.Pipeline` from a run directory or one checkpoint: the last stage of the data
flow (checkpoint -> pipeline). Generation itself lives in :mod:`flowmatch.sampling.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from flowmatch.sampling.generate import Pipeline

if TYPE_CHECKING:
    from flowmatch.families.config import ModelConfig

__all__ = ["Pipeline", "load_diffusers_pipeline", "load_pipeline"]


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
    from flowmatch.posthoc import load_named_ema

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    named = isinstance(ema, str)  # a reconstructed EMA lives in RUN_DIR/ema/, not in the checkpoint
    ckpt = resolve_checkpoint(path, reads=lambda c: (RECIPE_FILE,) if named else (RECIPE_FILE, weights_file(c, ema)))
    recipe = recipe_from_yaml((ckpt / RECIPE_FILE).read_text(), str(ckpt / RECIPE_FILE))
    encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=device)
    recipe.model = encoders.fill_model_config(recipe.model)
    weights = load_named_ema(ckpt, ema) if named else load_file(str(ckpt / weights_file(ckpt, ema)))
    model = checkpoint_model(ckpt, recipe.model, weights)
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, recipe, device=device)


def checkpoint_model(ckpt: Path, model_cfg: "ModelConfig", weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model of a checkpoint (its family's backbone) given its weights file's tensors: the whole model, or
    for a LoRA run (MMDiT only) the base weights its meta.json records (their hash checked) with the adapters
    applied through peft."""
    from flowmatch.checkpoint import read_meta
    from flowmatch.families import build_backbone
    from flowmatch.families.lora import apply_lora
    from flowmatch.init_from import from_meta, load_weights
    from flowmatch.models.lora import is_adapter

    if model_cfg.lora is None:
        model = build_backbone(model_cfg)
        model.load_state_dict(weights)
        return model
    base = from_meta(read_meta(ckpt).init_from)
    if base is None:
        raise ValueError(f"{ckpt} is a LoRA run but its meta.json records no base weights (init_from)")
    model = build_backbone(model_cfg, device="meta")
    model.load_state_dict(load_weights(base, verify=True), strict=True, assign=True)
    apply_lora(model, model_cfg.lora)
    loaded = model.load_state_dict(weights, strict=False)
    missing = [k for k in loaded.missing_keys if is_adapter(k)]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{ckpt}'s adapters do not fit its recipe's model.lora: missing {missing[:4]}, unexpected "
                         f"{loaded.unexpected_keys[:4]}")
    return model


def load_diffusers_pipeline(path: str | Path, *, device: Optional[torch.device | str] = None,
                            dtype: str = "fp32") -> Pipeline:
    """A :class:`Pipeline` from a diffusers StableDiffusion3Pipeline / FluxPipeline folder (or cached hub id).

    The transformer is converted by :func:`flowmatch.models.from_diffusers`; the text encoders, tokenizers, VAE
    and scheduler shift come from :func:`flowmatch.encoders.diffusers_folder.encoder_configs_from_pipeline`; the
    pipeline walks the scheduler's own float32 grid (:class:`~flowmatch.sampling.diffusers_schedule.PipelineGrid`)
    and takes the pipeline class's default steps, guidance and image size, so the same prompt, noise, steps,
    guidance and sigmas give the images diffusers gives.

    Args:
        path: the pipeline folder or hub id.
        device: where to run (CUDA when available by default).
        dtype: the encoders' and VAE's weights (fp32, bf16 or fp16); the transformer keeps the folder's values
            in fp32.
    """
    import dataclasses

    from flowmatch.config import Recipe
    from flowmatch.data.config import DataConfig
    from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.families.convert import from_diffusers
    from flowmatch.sampling.diffusers_schedule import PipelineGrid
    from flowmatch.sampling.generate import SamplingConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = encoder_configs_from_pipeline(path, dtype=dtype)
    model = from_diffusers(path).float()
    encoders = FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3, device=device)
    # The pipelines' default size: the transformer's sample_size (FLUX: 128) latents.
    sample_size = int(read_transformer_sample_size(path)) * encoders.downsample
    from flowmatch.families.config import ModelConfig

    recipe = Recipe(model=encoders.fill_model_config(ModelConfig(**dataclasses.asdict(model.cfg))), flow=configs.flow,
                    text_encoders=configs.text_encoders, autoencoder=configs.autoencoder,
                    data=DataConfig(resolution=sample_size, channels=3),
                    sampling=dataclasses.replace(SamplingConfig(), steps=configs.kind.steps,
                                                 guidance_scale=configs.kind.guidance_scale))
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, recipe, device=device,
                    pipeline_grid=PipelineGrid(configs.scheduler, configs.family))


def read_transformer_sample_size(path: str | Path) -> int:
    """The latent size a pipeline generates by default: the transformer config's sample_size (FLUX has none and
    uses 128)."""
    from flowmatch.encoders.diffusers_folder import read_pipeline_json

    return int(read_pipeline_json(path, "transformer/config.json").get("sample_size") or 128)
