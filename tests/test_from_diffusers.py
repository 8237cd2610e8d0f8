"""Conditioning exactly as diffusers' SD3 and FLUX pipelines build it, read from their folders, and
`Pipeline.from_diffusers` giving those pipelines' images, on the tiny random pipelines of tests.tiny_pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.sampling.diffusers_schedule import diffusers_sigmas
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table"]
PIXEL_ATOL = 1e-3
EMBED_ATOL = 1e-5
SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2


@pytest.fixture(scope="module")
def sd3(tiny_sd3_pipeline):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux(tiny_flux_pipeline):
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_reading_the_sd3_folder(tiny_sd3_pipeline):
    configs = encoder_configs_from_pipeline(tiny_sd3_pipeline)
    text = configs.text_encoders
    assert configs.pipeline_class == "StableDiffusion3Pipeline" and text.combine == "sd3"
    assert list(text.encoders) == ["clip_l", "clip_g", "t5"]
    clip_l, clip_g, t5 = text.encoders.values()
    assert (clip_l.subfolder, clip_l.tokenizer_subfolder, clip_g.subfolder, t5.subfolder) == (
        "text_encoder", "tokenizer", "text_encoder_2", "text_encoder_3")
    assert (clip_l.max_length, clip_l.hidden_layer, clip_l.pooling, clip_l.padding) == (77, -2, "projection",
                                                                                      "max_length")
    assert (t5.kind, t5.max_length, t5.padding, t5.dropped) == ("t5", 256, "max_length", "zeros")
    assert (configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (1.5305, 0.0609)
    assert (configs.flow.shift_mode, configs.flow.shift) == ("fixed", 3.0)
    assert text.guidance is None and not configs.guidance_embed


def test_reading_the_flux_folder(tiny_flux_pipeline):
    configs = encoder_configs_from_pipeline(tiny_flux_pipeline)
    text = configs.text_encoders
    assert configs.pipeline_class == "FluxPipeline" and text.combine == "flux"
    clip, t5 = text.encoders["clip_l"], text.encoders["t5"]
    assert (clip.pooling, clip.hidden_layer, clip.max_length) == ("pooler", None, 77)
    assert (t5.subfolder, t5.tokenizer_subfolder, t5.max_length, t5.dropped) == ("text_encoder_2", "tokenizer_2", 512,
                                                                              "empty")
    assert (configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (0.3611, 0.1159)
    assert (configs.flow.shift_mode, configs.flow.base_shift, configs.flow.max_shift) == ("sequence", 0.5, 1.15)
    assert configs.guidance_embed and text.guidance == 1.0


def test_not_a_supported_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        encoder_configs_from_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        encoder_configs_from_pipeline(tmp_path / "missing")


def _encoders(path) -> FrozenEncoders:
    configs = encoder_configs_from_pipeline(path)
    return FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3)


def test_sd3_conditioning_is_encode_prompt(tiny_sd3_pipeline, sd3):
    cond = _encoders(tiny_sd3_pipeline).encode_text(PROMPTS)
    hidden, negative, pooled, negative_pooled = sd3.encode_prompt(PROMPTS, PROMPTS, PROMPTS,
                                                                  do_classifier_free_guidance=True)
    assert cond.hidden.shape == (2, 77 + 256, 96) and cond.pooled.shape == (2, 32 + 48) and bool(cond.mask.all())
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=EMBED_ATOL)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=EMBED_ATOL)
    # CLIP-L and CLIP-G side by side, zero-padded from 80 to T5's 96.
    assert cond.hidden[:, :77, 80:].abs().max() == 0 and cond.hidden[:, :77, 32:80].abs().max() > 0
    null = _encoders(tiny_sd3_pipeline).null()
    torch.testing.assert_close(null.hidden, negative[:1], rtol=0, atol=EMBED_ATOL)
    torch.testing.assert_close(null.pooled, negative_pooled[:1], rtol=0, atol=EMBED_ATOL)


def test_flux_conditioning_is_encode_prompt(tiny_flux_pipeline, flux):
    cond = _encoders(tiny_flux_pipeline).encode_text(PROMPTS)
    hidden, pooled, _ = flux.encode_prompt(PROMPTS, PROMPTS)
    assert cond.hidden.shape == (2, 512, 64) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=EMBED_ATOL)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=EMBED_ATOL)
    assert torch.equal(cond.extra["guidance"], torch.ones(2))  # the training value the folder reader sets



def test_sd3_from_diffusers_generates_the_pipelines_images(tiny_sd3_pipeline, sd3):
    ours = Pipeline.from_diffusers(tiny_sd3_pipeline, device="cpu")
    assert (ours.recipe.sampling.steps, ours.recipe.sampling.guidance_scale) == (28, 7.0)
    noise = image_noise([0, 1], (LATENT_CHANNELS, SIZE // 2, SIZE // 2))
    steps, guidance = 4, 5.0

    def theirs(**kwargs):
        return sd3(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, output_type="pt", **kwargs).images

    default = ours.generate(PROMPTS, steps=steps, guidance_scale=guidance, noise=noise)
    assert max_diff(default, theirs()) < PIXEL_ATOL
    sigmas = diffusers_sigmas(steps)  # flowmatch's own grid, walked by both
    assert max_diff(ours.generate(PROMPTS, guidance_scale=guidance, noise=noise, sigmas=sigmas),
                     theirs(sigmas=sigmas)) < PIXEL_ATOL
    # The comparison can fail: another guidance scale moves the images far beyond the tolerance.
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=2.0, noise=noise), default) > 0.05


def test_flux_dev_from_diffusers_generates_the_pipelines_images(tiny_flux_pipeline, flux):
    ours = Pipeline.from_diffusers(tiny_flux_pipeline, device="cpu")
    assert ours.recipe.sampling.guidance_scale == 3.5 and ours.recipe.model.guidance_embed
    h = w = SIZE // 2
    noise = image_noise([0, 1], (LATENT_CHANNELS, h, w))
    packed = FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w)
    steps = 4

    def theirs(**kwargs):
        return flux(PROMPTS, latents=packed.clone(), num_inference_steps=steps, height=SIZE, width=SIZE,
                    output_type="pt", **kwargs).images

    default = ours.generate(PROMPTS, steps=steps, noise=noise)  # guidance 3.5, as FluxPipeline's default
    assert max_diff(default, theirs()) < PIXEL_ATOL
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=5.0, noise=noise),
                     theirs(guidance_scale=5.0)) < PIXEL_ATOL
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=1.0, noise=noise), default) > 0.05


def test_flowmatch_sample_takes_a_pipeline_folder(tiny_sd3_pipeline, tmp_path, capsys):
    """Bug caught: `flowmatch sample` reading a diffusers folder as a flowmatch run."""
    from flowmatch.cli import main

    out = tmp_path / "grid.png"
    args = ["sample", str(tiny_sd3_pipeline), "--prompt", "a red apple", "--num", "2", "--steps", "3",
            "--out", str(out)]
    assert main(args) == 0 and out.is_file()  # 32 x 32 pixels: the tiny transformer's sample_size x the VAE's 2
    assert "3 velocity evaluations" in capsys.readouterr().out
