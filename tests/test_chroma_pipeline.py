"""Chroma's pipeline: the conditioning ChromaPipeline builds (T5 alone, one padding token visible, no pooled
vector) read from its folder, and `Pipeline.from_diffusers` giving its images, on the tiny random pipeline of
tests/tiny_pipelines_chroma.py.

diffusers 0.42.1's ChromaPipeline hands the transformer its text mask as floats (1.0 / 0.0), which SDPA adds to
the attention scores instead of masking (diffusers issue #12116): padding keys keep weight e^-1 relative to
real ones. flowmatch masks as Chroma was trained (a boolean mask), so the images are compared with ChromaPipeline
given its own prompt embeddings and the same mask as booleans.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ChromaPipeline, FluxPipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table at night"]
PIXEL_ATOL = 1e-3
EMBED_ATOL = 1e-5
SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2


@pytest.fixture(scope="module")
def chroma(tiny_chroma_pipeline):
    pipe = ChromaPipeline.from_pretrained(tiny_chroma_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_is_encode_prompt_with_one_padding_token_visible(tiny_chroma_pipeline, chroma):
    configs = encoder_configs_from_pipeline(tiny_chroma_pipeline)
    assert configs.family == "chroma" and configs.text_encoders.combine == "single"
    (t5,) = configs.text_encoders.encoders.values()
    assert (t5.kind, t5.max_length, t5.padding) == ("t5", 512, "max_length_plus_one")
    encoders = FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3, device="cpu")
    cond = encoders.encode_text(PROMPTS)
    hidden, _, mask, *_ = chroma.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(cond.mask, mask.bool())
    real = chroma.tokenizer(PROMPTS, return_tensors="pt", padding=True).attention_mask.sum(1)
    assert torch.equal(cond.mask.sum(1), real + 1)  # every real token and the first padding token
    visible = mask.bool()[..., None]
    torch.testing.assert_close(cond.hidden, hidden * visible, rtol=0, atol=EMBED_ATOL)
    # remembered captions keep the same visible tokens (the padding past them is padding again)
    cached = dataclasses.replace(configs.text_encoders, encoders={"t5": dataclasses.replace(t5, cache_size=4)})
    again = FrozenEncoders(cached, configs.autoencoder, image_channels=3, device="cpu").encode_text(PROMPTS)
    kept = again.length  # the longest visible row
    assert torch.equal(again.mask, cond.mask[:, :kept]) and not cond.mask[:, kept:].any()
    torch.testing.assert_close(again.hidden, cond.hidden[:, :kept], rtol=0, atol=EMBED_ATOL)


def test_from_diffusers_generates_the_pipelines_images(tiny_chroma_pipeline, chroma):
    ours = Pipeline.from_diffusers(tiny_chroma_pipeline, device="cpu")
    assert (ours.recipe.sampling.steps, ours.recipe.sampling.guidance_scale) == (35, 5.0)
    h = w = SIZE // 2
    noise = image_noise([0, 1], (LATENT_CHANNELS, h, w))
    packed = FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w)
    steps = 4
    embeds, _, mask, negative, _, negative_mask = chroma.encode_prompt(PROMPTS, negative_prompt=["", ""])

    def theirs(guidance, **kwargs):
        return chroma(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                      negative_prompt_attention_mask=negative_mask.bool(), latents=packed.clone(),
                      num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                      output_type="pt", **kwargs).images

    default = ours.generate(PROMPTS, steps=steps, noise=noise)  # guidance 5.0, as ChromaPipeline's default
    assert max_diff(default, theirs(5.0)) < PIXEL_ATOL
    sigmas = [1.0, 0.7, 0.4, 0.2]
    assert max_diff(ours.generate(PROMPTS, guidance_scale=2.0, noise=noise, sigmas=sigmas),
                     theirs(2.0, sigmas=sigmas)) < PIXEL_ATOL
    # The comparison can fail: another guidance scale moves the images far beyond the tolerance.
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=2.0, noise=noise), default) > 0.05

