"""Training with a diffusers pipeline's encoders (read from its folder) and exporting a complete pipeline folder
that `DiffusionPipeline.from_pretrained` loads, with the run's transformer and shift, and that generates the run's
images, on the tiny random SD3 and FLUX-dev pipelines of tests.tiny_pipelines and the digits shards (as 32x32
RGB)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from flowmatch import Pipeline
from flowmatch.checkpoint import load_weights
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.convert import from_diffusers
from flowmatch.sampling.diffusers_schedule import diffusers_sigmas
from flowmatch.training import train
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_train import tiny_recipe
from tests.tiny_pipelines import LATENT_CHANNELS

SIZE = 32
PROMPTS = ["a handwritten 3", "a photo of a cat"]
PIXEL_ATOL = 1e-3


def train_on(pipeline: Path, run: Path, shards: Path, preset: str, t5_dropout=None, **flow) -> Path:
    """Two steps of a tiny model of `preset` conditioned by `pipeline`'s encoders (T5 dropped with `t5_dropout`,
    the others with the flow section's 0.5), its VAE and (with `flow`'s changes) its shift."""
    configs = encoder_configs_from_pipeline(pipeline)
    configs.text_encoders.encoders["t5"].caption_dropout = t5_dropout
    recipe = tiny_recipe(run, shards, **{"model.preset": preset, "train.max_steps": 2, "train.batch_size": 4,
                                         "data.channels": 3, "data.resolution": SIZE, "sampling.steps": 1})
    recipe = dataclasses.replace(recipe, text_encoders=configs.text_encoders, autoencoder=configs.autoencoder,
                                 flow=dataclasses.replace(configs.flow, caption_dropout=0.5, **flow))
    train(recipe)
    return run


DROPPED: list = []
"""The per-encoder dropout settings the SD3 run's trainer passed to caption dropout."""


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_pipeline, digit_shards, tmp_path_factory) -> Path:
    import flowmatch.flow.objectives as objectives

    real = objectives.drop_captions

    def record(cond, null, p, *, generator=None, parts=None):
        DROPPED.append([(part.name, q) for part, q in parts or []])
        return real(cond, null, p, generator=generator, parts=parts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objectives, "drop_captions", record)
        return train_on(tiny_sd3_pipeline, tmp_path_factory.mktemp("sd3-run") / "run", digit_shards,
                        "tiny-sd3-medium", t5_dropout=0.25, shift=2.0)


def test_training_drops_each_encoder_with_its_own_probability(sd3_run):
    """Bug caught: the trainer dropping whole captions (no per-encoder parts) with several encoders."""
    assert DROPPED and all(d == [("clip_l", 0.5), ("clip_g", 0.5), ("t5", 0.25)] for d in DROPPED)


@pytest.fixture(scope="module")
def flux_run(tiny_flux_pipeline, digit_shards, tmp_path_factory) -> Path:
    return train_on(tiny_flux_pipeline, tmp_path_factory.mktemp("flux-run") / "run", digit_shards, "tiny-flux-dev")


def _same_weights(out: Path, run: Path) -> None:
    back = from_diffusers(out / "transformer").state_dict()
    for name, value in load_weights(run, ema=True).items():
        assert torch.equal(back[name], value), name


def test_sd3_run_exports_a_complete_pipeline(sd3_run, tiny_sd3_pipeline, tmp_path):
    out = tmp_path / "out"
    summary = export(sd3_run, out)
    assert any("complete StableDiffusion3Pipeline folder" in n for n in summary.notes), summary.notes
    names = {p.relative_to(out).parts[0] for p in summary.files}
    assert names >= {"model_index.json", "transformer", "scheduler", "vae", "text_encoder", "text_encoder_2",
                     "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"}
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.scheduler.config.shift == 2.0  # the run's, not the source pipeline's 3.0
    _same_weights(out, sd3_run)
    # The folder generates the run's images: the checkpoint's pipeline on flowmatch's grid, the exported one given
    # that grid as sigmas.
    noise = torch.randn(2, LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    assert _max_diff(sd3_run, pipe, noise, noise.clone()) < PIXEL_ATOL


def _max_diff(run: Path, pipe, noise: torch.Tensor, latents: torch.Tensor, steps: int = 4) -> float:
    """Max abs pixel difference between the run's checkpoint pipeline and `pipe`, from the same noise (`latents`:
    as `pipe` takes it), with flowmatch's grid and guidance 3."""
    pipe.set_progress_bar_config(disable=True)
    sigmas = diffusers_sigmas(steps)
    theirs = pipe(PROMPTS, latents=latents, num_inference_steps=steps, sigmas=sigmas, guidance_scale=3.0,
                  height=SIZE, width=SIZE, output_type="pt").images
    ours = Pipeline.from_checkpoint(run, device="cpu").generate(PROMPTS, noise=noise, sigmas=sigmas,
                                                                 guidance_scale=3.0)
    return (ours - theirs).abs().max().item()


def test_flux_dev_run_exports_a_complete_pipeline(flux_run, tmp_path):
    out = tmp_path / "out"
    summary = export(flux_run, out, dtype="fp32")
    assert any("complete FluxPipeline folder" in n for n in summary.notes), summary.notes
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    assert json.loads((out / "model_index.json").read_text())["transformer"] == ["diffusers",
                                                                                "FluxTransformer2DModel"]
    _same_weights(out, flux_run)
    noise = torch.randn(2, LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    assert _max_diff(flux_run, pipe, noise, packed) < PIXEL_ATOL  # guidance 3 embedded by both


def test_changed_encoder_settings_export_the_transformer_alone(sd3_run, tmp_path):
    from flowmatch.config import recipe_from_yaml
    from flowmatch.pipeline_folder import pipeline_source

    recipe = recipe_from_yaml((sd3_run / "recipe.yaml").read_text())
    source, why = pipeline_source(recipe)
    assert source is not None and why == ""
    source, why = pipeline_source(recipe, "FluxTransformer2DModel")
    assert source is None and "holds a SD3Transformer2DModel" in why
    recipe.text_encoders.encoders["t5"].max_length = 128
    source, why = pipeline_source(recipe)
    assert source is None and "text_encoders.encoders.t5.max_length is 128" in why
