"""Pipeline.from_diffusers on a tiny random QwenImagePipeline folder (tests/tiny_pipelines_qwen.py): the folder
read into flowmatch's sections, and the pipeline's images from the same latents, steps and sigmas, with true CFG
and a negative prompt."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines_qwen import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table"]
NEGATIVE = "blurry, bad quality"
PIXEL_ATOL = 1e-3
SIZE = 32  # pixels: 8x8 latents at the tiny VAE's factor 4, 16 packed tokens
#: The tiny VAE's factor (two spatial halvings), which diffusers' (un)packing helpers take.
VAE_FACTOR = 4


@pytest.fixture(scope="module")
def qwen(tiny_qwen_pipeline):
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_qwen_pipeline):
    return Pipeline.from_diffusers(tiny_qwen_pipeline, device="cpu")


def test_the_family_and_recipe_encode_text_as_the_pipeline(qwen):
    """The template and dropped prefix flowmatch states (the family, the recipe) are the pipeline's own."""
    from flowmatch.config import load_recipe
    from flowmatch.families.qwen_image import TEXT_ENCODER
    from tests.test_train import ROOT

    assert TEXT_ENCODER["template"] == qwen.prompt_template_encode
    assert TEXT_ENCODER["drop_tokens"] == qwen.prompt_template_encode_start_idx
    recipe = load_recipe(ROOT / "recipes" / "qwen-image-lora.yaml", [])
    encoder = recipe.text_encoders.encoders["qwen"]
    assert {k: getattr(encoder, k) for k in TEXT_ENCODER} == TEXT_ENCODER


def test_reading_the_qwen_folder(tiny_qwen_pipeline, ours):
    configs = encoder_configs_from_pipeline(tiny_qwen_pipeline)
    (name, text), = configs.text_encoders.encoders.items()
    assert configs.pipeline_class == "QwenImagePipeline" and configs.text_encoders.combine == "single"
    assert (name, text.kind, text.drop_tokens, text.hidden_layer, text.pooling, text.max_length) == (
        "qwen", "decoder_llm", 34, -1, "none", 512)
    assert text.model_class == "Qwen2_5_VLForConditionalGeneration" and text.template.count("{}") == 1
    assert (configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (None, None)
    assert configs.flow.shift_mode == "sequence" and configs.flow.max_shift == 0.9
    assert ours.recipe.model.pooled_dim == 0 and ours.recipe.sampling.steps == 50
    assert ours.config.guidance_renorm == 2 and ours.encoders.downsample == VAE_FACTOR
    # QwenImagePipeline hands its transformer timestep / 1000 in float32, which embeds t * 1000 again: rounded.
    t = torch.linspace(0, 1, 1001)
    assert torch.equal(ours.pipeline_grid.model_time(t), (t * 1000) / 1000)
    assert not torch.equal(ours.pipeline_grid.model_time(t), t)


def test_from_diffusers_generates_the_pipelines_images(ours, qwen):
    """Bugs caught: the negative prompt ignored (guided against the empty caption), the per-token renormalisation
    of true CFG left out, the per-channel latent statistics not undone."""
    h = w = SIZE // VAE_FACTOR
    noise = image_noise([0, 1], (LATENT_CHANNELS, h, w))
    packed = QwenImagePipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w)
    steps = 3

    def theirs(**kwargs):
        return qwen(PROMPTS, latents=packed.clone(), num_inference_steps=steps, height=SIZE, width=SIZE,
                    output_type="pt", **kwargs).images

    guided = ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=4.0, negative_prompt=NEGATIVE)
    assert max_diff(guided, theirs(negative_prompt=NEGATIVE, true_cfg_scale=4.0)) < PIXEL_ATOL
    plain = ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=1.0)
    assert max_diff(plain, theirs()) < PIXEL_ATOL
    sigmas = [1.0, 0.7, 0.3]
    assert max_diff(ours.generate(PROMPTS, noise=noise, guidance_scale=1.0, sigmas=sigmas),
                     theirs(sigmas=sigmas)) < PIXEL_ATOL
    # The comparisons can fail: guidance against the empty caption instead moves the images well past the bound.
    assert max_diff(ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=4.0), guided) > 20 * PIXEL_ATOL

