"""LoRA on released-layout pipelines, end to end on the tiny random SD3 and FLUX.1-dev pipelines of
tests.tiny_pipelines: `model.init_from` a pipeline folder, train adapters with its encoders on the digits (as
32x32 RGB), `flowmatch export --lora` into `StableDiffusion3Pipeline` / `FluxPipeline.load_lora_weights`, and the
images against flowmatch's own LoRA pipeline on the same folder, noise, steps and guidance; `--merge` as a
complete pipeline folder; every `--format` of the trained adapters through `flowmatch lora check`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from flowmatch import Pipeline
from flowmatch.checkpoint import read_meta
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.config import ModelConfig
from flowmatch.lora_check import check_lora
from flowmatch.models.lora import LoraConfig
from flowmatch.training import train
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_train import tiny_recipe
from tests.tiny_pipelines import LATENT_CHANNELS

SIZE = 32
PROMPTS = ["a handwritten 3", "a photo of a cat"]
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


def lora_run(pipeline: Path, run: Path, shards: Path) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the pipeline's transformer, with its encoders, VAE and shift. The
    model section is built in code, so it states no architecture: it comes from the pipeline's transformer."""
    configs = encoder_configs_from_pipeline(pipeline)
    recipe = tiny_recipe(run, shards, **{"train.max_steps": 2, "train.batch_size": 4, "data.channels": 3,
                                         "data.resolution": SIZE, "sampling.steps": 1, "optim.lr": 0.05,
                                         "optim.schedule": "constant"})
    model = ModelConfig(init_from=str(pipeline), lora=LoraConfig(rank=4, alpha=8))
    train(dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                              autoencoder=configs.autoencoder, flow=configs.flow))
    return run


def same_images(pipeline: Path, run: Path, out: Path, pipeline_class) -> None:
    """diffusers' pipeline with the exported adapters, and with the merged export, against flowmatch's."""
    exported = export(run, out / "lora", lora=True, weights="raw")
    assert exported.files == [out / "lora" / "pytorch_lora_weights.safetensors"]
    export(run, out / "merged", merge=True, weights="raw")
    g = torch.Generator().manual_seed(0)
    channels = LATENT_CHANNELS
    noise = torch.randn(len(PROMPTS), channels, SIZE // 2, SIZE // 2, generator=g)
    ours = Pipeline.from_diffusers(pipeline, device="cpu")
    base_images = ours.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, noise=noise)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's own LoRA model
    want = ours.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, noise=noise)

    theirs = pipeline_class.from_pretrained(pipeline)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(out / "lora")
    latents = noise.clone() if pipeline_class.__name__.startswith("StableDiffusion3") else pack(noise)
    got = theirs(PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                 width=SIZE, output_type="pt").images
    merged = DiffusionPipeline.from_pretrained(out / "merged")
    merged.set_progress_bar_config(disable=True)
    got_merged = merged(PROMPTS, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        height=SIZE, width=SIZE, output_type="pt").images
    assert isinstance(merged, pipeline_class)
    err, err_merged, moved = ((got - want).abs().max().item(), (got_merged - want).abs().max().item(),
                              (base_images - want).abs().max().item())
    print(f"{pipeline_class.__name__}: LoRA images max |diffusers - flowmatch| {err:.2e}, merged {err_merged:.2e}; "
          f"the adapters move the images by {moved:.2e}")
    assert err < PIXEL_ATOL and err_merged < PIXEL_ATOL
    assert moved > 10 * PIXEL_ATOL  # the adapters trained enough to matter
    # Each export format of the trained adapters through `flowmatch lora check` on the same folder.
    for fmt in ("diffusers", "comfyui", "kohya"):
        file = export(run, out / f"lora-{fmt}", lora=True, fmt=fmt, weights="raw").files[0]
        result = check_lora(file, pipeline, prompts=PROMPTS, steps=STEPS, size=SIZE, guidance=GUIDANCE)
        print(f"{pipeline_class.__name__} {fmt}: reference {result.reference}, max diff {result.max_diff:.2e}, "
              f"effect {result.effect:.2e}")
        assert result.passed, result.describe()


def pack(noise: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = noise.shape
    return FluxPipeline._pack_latents(noise, b, c, h, w)


def test_sd3_lora_from_a_pipeline_folder_round_trips_through_load_lora_weights(tiny_sd3_pipeline, digit_shards,
                                                                               tmp_path):
    from diffusers import StableDiffusion3Pipeline

    run = lora_run(tiny_sd3_pipeline, tmp_path / "run", digit_shards)
    recorded = read_meta(run).init_from
    assert recorded["kind"] == "diffusers" and Path(recorded["path"]) == (tiny_sd3_pipeline / "transformer").resolve()
    same_images(tiny_sd3_pipeline, run, tmp_path, StableDiffusion3Pipeline)


def test_flux_dev_lora_round_trips_through_load_lora_weights(tiny_flux_pipeline, digit_shards, tmp_path):
    from diffusers import FluxPipeline

    run = lora_run(tiny_flux_pipeline, tmp_path / "run", digit_shards)
    same_images(tiny_flux_pipeline, run, tmp_path, FluxPipeline)
