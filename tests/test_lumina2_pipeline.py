"""Pipeline.from_diffusers on a tiny random Lumina2Pipeline folder (tests/tiny_pipelines_lumina2.py): the folder
read into flowmatch's sections, and the pipeline's images from the same latents, steps and sigmas, with its
default normalised classifier-free guidance against the empty negative prompt."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.families import family_of
from flowmatch.families.lumina2 import TEXT_ENCODER
from flowmatch.sampling.diffusers_schedule import PipelineGrid
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines_lumina2 import LATENT_CHANNELS, VAE_FACTOR, VAE_FACTORS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table"]
PIXEL_ATOL = 1e-3
HEIGHT, WIDTH = 64, 32  # pixels: 8x4 latents at the VAE's factor 8, 4x2 tokens of 2x2 patches


@pytest.fixture(scope="module")
def lumina(tiny_lumina2_pipeline):
    pipe = Lumina2Pipeline.from_pretrained(tiny_lumina2_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_lumina2_pipeline):
    return Pipeline.from_diffusers(tiny_lumina2_pipeline, device="cpu")


def test_reading_the_lumina2_folder(tiny_lumina2_pipeline, lumina, ours):
    """The template flowmatch states is the pipeline's own join of its system prompt and the prompt."""
    assert TEXT_ENCODER["template"] == lumina.system_prompt + " <Prompt Start> {}"
    configs = encoder_configs_from_pipeline(tiny_lumina2_pipeline)
    (name, text), = configs.text_encoders.encoders.items()
    assert configs.pipeline_class == "Lumina2Pipeline" and configs.family == "lumina2"
    assert (name, text.kind, text.drop_tokens, text.hidden_layer, text.pooling, text.max_length) == (
        "gemma", "decoder_llm", 0, -2, "none", 256)
    assert text.model_class == "Gemma2Model" and text.empty_template == ""
    assert (configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (
        VAE_FACTORS["scaling_factor"], VAE_FACTORS["shift_factor"])
    assert configs.flow.shift_mode == "fixed" and configs.flow.shift == 6.0
    assert family_of(ours.recipe.model).name == "lumina2" and ours.recipe.sampling.steps == 30
    assert ours.config.guidance_renorm_rows and ours.encoders.downsample == VAE_FACTOR
    # Lumina2Pipeline hands its transformer 1 - timestep / 1000 in float32: the module's 1 - t of a rounded t.
    t = torch.linspace(0, 1, 1001)
    assert torch.equal(ours.pipeline_grid.model_time(t), (t * 1000) / 1000)



def test_from_diffusers_generates_the_pipelines_images(ours, lumina):
    """Bugs caught: the system prompt left out or dropped from the states, the wrong hidden layer, the negative
    prompt templated, the per-row renormalisation left out, the reversed time or velocity not turned around, the
    VAE's scale and shift not undone."""
    noise = image_noise([0, 1], (LATENT_CHANNELS, HEIGHT // VAE_FACTOR, WIDTH // VAE_FACTOR))
    steps = 3

    def theirs(**kwargs):
        return lumina(PROMPTS, latents=noise.clone(), num_inference_steps=steps, height=HEIGHT, width=WIDTH,
                      output_type="pt", **kwargs).images

    guided = ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=4.0)
    reference = theirs(guidance_scale=4.0)
    plain = theirs(guidance_scale=1.0)
    assert max_diff(guided, reference) < PIXEL_ATOL
    assert max_diff(ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=1.0), plain) < PIXEL_ATOL
    assert max_diff(reference, plain) > 100 * PIXEL_ATOL  # guidance moves the images far more than the tolerance


def test_a_dynamic_shift_scheduler_walks_the_pipelines_grid(lumina):
    """Lumina2Pipeline computes a dynamic shift's mu from latents.shape[1], its latents' channel count, not the
    image's token count. Bug caught: mu from the token count (the grid FLUX's pipeline walks)."""
    dynamic = dict(lumina.scheduler.config, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = Lumina2Pipeline(**{**lumina.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(dynamic)})
    pipe.set_progress_bar_config(disable=True)
    steps, latent_h, latent_w = 4, 8, 4
    noise = image_noise([0], (LATENT_CHANNELS, latent_h, latent_w))
    pipe(PROMPTS[:1], latents=noise, num_inference_steps=steps, height=latent_h * VAE_FACTOR,
         width=latent_w * VAE_FACTOR, output_type="latent", guidance_scale=1.0)
    grid = PipelineGrid(dynamic, "lumina2").grid(steps, seq_len=(latent_h // 2) * (latent_w // 2),
                                                 channels=LATENT_CHANNELS)
    assert grid == pipe.scheduler.sigmas.double().tolist()
