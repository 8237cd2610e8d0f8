"""A ready :class:`Pipeline` from a run directory, one checkpoint or a diffusers pipeline folder: the last stage of
the data flow (checkpoint -> pipeline). Generation itself lives in :mod:`flowmatch.sampling.generate` (the class
this one extends with its loaders); opening a run lives in :mod:`flowmatch.run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from flowmatch import sampling
from flowmatch.config import Recipe
from flowmatch.data.config import DataConfig
from flowmatch.encoders.diffusers_folder import MODEL_INDEX, encoder_configs_from_pipeline, read_pipeline_json
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import from_diffusers
from flowmatch.run import ENCODER_SECTIONS, checkpoint_model, open_run
from flowmatch.sampling.diffusers_schedule import PipelineGrid
from flowmatch.sampling.generate import GenerationConfig, SamplingConfig

__all__ = ["MODEL_INDEX", "Pipeline", "checkpoint_model", "load_diffusers_pipeline", "load_pipeline"]


class Pipeline(sampling.Pipeline):
    """:class:`flowmatch.sampling.Pipeline` (generate images from captions) with its loaders.

    >>> pipe = Pipeline.from_checkpoint("runs/digits")
    >>> images = pipe.generate(["a handwritten digit seven"] * 8, steps=20, seed=0)  # (8, C, H, W) in [0, 1]
    """

    @classmethod
    def from_checkpoint(cls, path, *, device: Optional[torch.device | str] = None, ema: Optional[bool | str] = None,
                        relocate: Optional[Mapping[str, str]] = None) -> "Pipeline":
        """Load a run directory (its newest checkpoint) or one checkpoint directory; see :func:`load_pipeline`."""
        return load_pipeline(path, device=device, ema=ema, relocate=relocate)

    @classmethod
    def from_diffusers(cls, path, *, device: Optional[torch.device | str] = None,
                       dtype: str = "fp32") -> "Pipeline":
        """A diffusers pipeline folder (or hub id) of a family flowmatch reads (SD3, FLUX, FLUX.2 klein and dev, ...,
        :data:`flowmatch.families.PIPELINES`): its transformer, text
        encoders, tokenizers, VAE and scheduler, generating the images its own pipeline class generates from the
        same prompt, noise, steps, guidance, sigmas (and reference images); see :func:`load_diffusers_pipeline`."""
        return load_diffusers_pipeline(path, device=device, dtype=dtype)


def load_pipeline(path: str | Path, *, device: Optional[torch.device | str] = None,
                  ema: Optional[bool | str] = None, relocate: Optional[Mapping[str, str]] = None) -> Pipeline:
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
        relocate: recipe path key -> path, for assets moved since the run recorded them (e.g.
            ``{"autoencoder.name_or_path": "/new/vae"}``); relative paths the run recorded are otherwise read where
            it was trained (:mod:`flowmatch.run.paths`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = open_run(path, ema=ema, relocate=relocate, needs=ENCODER_SECTIONS)
    recipe = run.recipe
    encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=device)
    recipe.model = encoders.fill_model_config(recipe.model)
    model = checkpoint_model(run.checkpoint, recipe.model, run.weights)
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, GenerationConfig.of(recipe), device=device, recipe=recipe)


def load_diffusers_pipeline(path: str | Path, *, device: Optional[torch.device | str] = None,
                            dtype: str = "fp32") -> Pipeline:
    """A :class:`Pipeline` from a diffusers StableDiffusion3Pipeline / FluxPipeline / FluxKontextPipeline folder
    (or cached hub id); a Kontext pipeline resizes reference images as FluxKontextPipeline does.

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
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = encoder_configs_from_pipeline(path, dtype=dtype)
    model = from_diffusers(path).float()
    encoders = FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3, device=device)
    # The pipelines' default size: the transformer's sample_size (FLUX: 128) latents.
    sample_size = int(read_transformer_sample_size(path)) * encoders.downsample

    recipe = Recipe(model=encoders.fill_model_config(ModelConfig(**dataclasses.asdict(model.cfg))), flow=configs.flow,
                    text_encoders=configs.text_encoders, autoencoder=configs.autoencoder,
                    data=DataConfig(resolution=sample_size, channels=3),
                    sampling=dataclasses.replace(SamplingConfig(), steps=configs.kind.steps,
                                                 guidance_scale=configs.kind.guidance_scale))
    model.to(device).eval().requires_grad_(False)
    return Pipeline(model, encoders, GenerationConfig.of(recipe), device=device, recipe=recipe,
                    pipeline_grid=PipelineGrid(configs.scheduler, configs.pipeline_class),
                    reference_size=configs.kind.reference_size)


def read_transformer_sample_size(path: str | Path) -> int:
    """The latent size a pipeline generates by default: the transformer config's sample_size (FLUX has none and
    uses 128)."""
    return int(read_pipeline_json(path, "transformer/config.json").get("sample_size") or 128)
