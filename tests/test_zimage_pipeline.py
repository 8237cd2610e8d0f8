"""Pipeline.from_diffusers on a tiny random ZImagePipeline folder (tests/tiny_pipelines_zimage.py): the folder read
into flowmatch's sections, and the pipeline's images from the same latents, steps and sigmas, with and without
guidance (ZImagePipeline's scale g is flowmatch's classifier-free scale g + 1)."""

from __future__ import annotations

import pytest
from diffusers import ZImagePipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.families.zimage import PROMPT_TEMPLATE
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table"]
PIXEL_ATOL = 1e-3
SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2, 64 image tokens
VAE_FACTOR = 2


@pytest.fixture(scope="module")
def zimage(tiny_zimage_pipeline):
    pipe = ZImagePipeline.from_pretrained(tiny_zimage_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_zimage_pipeline):
    return Pipeline.from_diffusers(tiny_zimage_pipeline, device="cpu")


def test_reading_the_zimage_folder(tiny_zimage_pipeline, zimage, ours):
    configs = encoder_configs_from_pipeline(tiny_zimage_pipeline)
    (name, text), = configs.text_encoders.encoders.items()
    assert configs.pipeline_class == "ZImagePipeline" and configs.text_encoders.combine == "single"
    assert (name, text.kind, text.drop_tokens, text.hidden_layer, text.pooling, text.max_length) == (
        "qwen", "decoder_llm", 0, -2, "none", 512)
    assert text.model_class == "Qwen3Model"
    # the family's template is what the pipeline's chat template writes for one user turn
    templated = zimage.tokenizer.apply_chat_template([{"role": "user", "content": "{}"}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=True)
    assert text.template == PROMPT_TEMPLATE == templated
    assert (configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (0.3611, 0.1159)
    assert ours.recipe.model.pooled_dim == 0 and ours.recipe.sampling.steps == 50
    assert ours.recipe.sampling.guidance_scale == 6.0  # the pipeline's default 5.0, as classifier-free guidance


def test_from_diffusers_generates_the_pipelines_images(ours, zimage):
    """Bugs caught: the reversed time or negated velocity lost at the family boundary, the second-to-last hidden
    layer or the chat template not the pipeline's, the VAE's scale and shift not undone, guidance off by one."""
    noise = image_noise([0, 1], (LATENT_CHANNELS, SIZE // VAE_FACTOR, SIZE // VAE_FACTOR))
    steps = 3

    def theirs(**kwargs):  # the pipeline templates its prompt list in place: give it a copy
        return zimage(list(PROMPTS), latents=noise.clone(), num_inference_steps=steps, height=SIZE, width=SIZE,
                      output_type="pt", **kwargs).images

    guided = ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=3.0)
    assert max_diff(guided, theirs(guidance_scale=2.0)) < PIXEL_ATOL
    plain = ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=1.0)
    assert max_diff(plain, theirs(guidance_scale=0.0)) < PIXEL_ATOL
    sigmas = [1.0, 0.7, 0.3]
    assert max_diff(ours.generate(PROMPTS, noise=noise, guidance_scale=1.0, sigmas=sigmas),
                     theirs(sigmas=sigmas, guidance_scale=0.0)) < PIXEL_ATOL
    # The comparisons can fail: guidance off by one moves the images well past the bound.
    assert max_diff(ours.generate(PROMPTS, steps=steps, noise=noise, guidance_scale=2.0), guided) > 20 * PIXEL_ATOL

