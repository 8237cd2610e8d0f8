"""FLUX.2 [klein] LoRA end to end on the tiny random Flux2KleinPipeline of tests/tiny_pipelines_flux2.py:
`model.init_from` the pipeline folder (read as the FLUX.2 family), adapters trained with its Qwen3 (every one of
the 512 positions seen) and its VAE's batch-norm statistics, `flowmatch export --lora` into
`Flux2KleinPipeline.load_lora_weights` and `--merge` as a complete folder `DiffusionPipeline.from_pretrained`
loads as a Flux2KleinPipeline, both giving flowmatch's images from the same latents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.config import ModelConfig
from flowmatch.models.lora import LoraConfig
from flowmatch.training import train
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_train import tiny_recipe
from tests.tiny_pipelines_flux2 import LATENT_CHANNELS

SIZE = 32
PROMPTS = ["a handwritten 3", "a photo of a cat"]
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


def flux2_lora_run(pipeline: Path, run: Path, shards: Path) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the klein pipeline's transformer, with its encoder, VAE and
    shift; the architecture comes from the pipeline's transformer."""
    configs = encoder_configs_from_pipeline(pipeline)
    recipe = tiny_recipe(run, shards, **{"train.max_steps": 2, "train.batch_size": 4, "data.channels": 3,
                                         "data.resolution": SIZE, "sampling.steps": 1,
                                         "model.preset": "tiny-flux2-klein-4b", "optim.lr": 0.05,
                                         "optim.schedule": "constant"})
    model = ModelConfig(init_from=str(pipeline), lora=LoraConfig(rank=4, alpha=8))
    train(dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                              autoencoder=configs.autoencoder, flow=configs.flow))
    return run


def _images(pipe: Flux2KleinPipeline, latents: torch.Tensor) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, output_type="pt").images


def test_flux2_lora_round_trips_through_load_lora_weights_and_a_merged_export(tiny_flux2_pipeline, digit_shards,
                                                                              tmp_path):
    run = flux2_lora_run(tiny_flux2_pipeline, tmp_path / "run", digit_shards)
    out = tmp_path / "out"
    assert export(run, out / "lora", lora=True, weights="raw").files == [out / "lora" /
                                                                          "pytorch_lora_weights.safetensors"]
    merged_summary = export(run, out / "merged", merge=True, weights="raw")
    assert any("complete Flux2KleinPipeline folder" in n for n in merged_summary.notes), merged_summary.notes
    assert json.loads((out / "merged" / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"

    noise = torch.randn(len(PROMPTS), LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    ours = Pipeline.from_diffusers(tiny_flux2_pipeline, device="cpu")
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, noise=noise)
    base_images = ours.generate(PROMPTS, **kw)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's own LoRA model
    want = ours.generate(PROMPTS, **kw)

    patched = Flux2KleinPipeline._patchify_latents(noise)
    theirs = Flux2KleinPipeline.from_pretrained(tiny_flux2_pipeline)
    theirs.load_lora_weights(out / "lora")
    merged = DiffusionPipeline.from_pretrained(out / "merged")
    assert isinstance(merged, Flux2KleinPipeline)
    errors = [(_images(pipe, patched.clone()) - want).abs().max().item() for pipe in (theirs, merged)]
    moved = (base_images - want).abs().max().item()
    print(f"Flux2KleinPipeline: LoRA images max |diffusers - flowmatch| {errors[0]:.2e}, merged {errors[1]:.2e}; "
          f"the LoRA moved them by {moved:.2e}")
    assert max(errors) < PIXEL_ATOL
    assert moved > 10 * max(errors) and moved > 10 * PIXEL_ATOL  # the adapters did something the check can see
