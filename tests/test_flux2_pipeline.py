"""FLUX.2 [klein]'s pipeline: the conditioning Flux2KleinPipeline builds (Qwen3 through its chat template, hidden
states 9, 18 and 27 side by side, every one of the 512 positions seen) read from its folder, its VAE's batch-norm
latent statistics, and `Pipeline.from_diffusers` giving its images with the same latents, steps and sigmas, on the
tiny random pipeline of tests/tiny_pipelines_flux2.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines_flux2 import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table at night"]
PIXEL_ATOL = 1e-3
EMBED_ATOL = 1e-5
SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2, 8x8 packed tokens


@pytest.fixture(scope="module")
def klein(tiny_flux2_pipeline):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_flux2_pipeline):
    return Pipeline.from_diffusers(tiny_flux2_pipeline, device="cpu")


def test_conditioning_is_encode_prompt_every_position_seen(tiny_flux2_pipeline, klein):
    configs = encoder_configs_from_pipeline(tiny_flux2_pipeline)
    assert configs.family == "flux2" and configs.text_encoders.combine == "single"
    (qwen,) = configs.text_encoders.encoders.values()
    assert (qwen.kind, qwen.max_length, qwen.padding, qwen.stack_layers) == ("decoder_llm", 512, "max_length",
                                                                              [9, 18, 27])
    encoders = FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3, device="cpu")
    cond = encoders.encode_text(PROMPTS)
    hidden, text_ids = klein.encode_prompt(PROMPTS)
    assert cond.all_valid and cond.hidden.shape == hidden.shape == (2, 512, 48)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=EMBED_ATOL)


def test_vae_latents_are_the_pipelines_patchified_and_normalised(ours, klein):
    images = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    latents = ours.encoders.autoencoder.encode(images)  # (1, 4, 16, 16): 32 channels at release size
    assert latents.shape == (1, LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    theirs = klein._encode_vae_image(images, generator=None)  # (1, 16, 8, 8), patchified and normalised
    torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(latents), theirs, rtol=1e-5, atol=1e-5)
    # the statistics are not the identity: the normalisation is there to be checked
    raw = klein.vae.encode(images).latent_dist.mode()
    assert (Flux2KleinPipeline._patchify_latents(raw) - theirs).abs().max() > 0.1


@pytest.mark.slow  # three guided generations on each side: about 5 s
def test_from_diffusers_generates_the_pipelines_images(ours, klein):
    assert (ours.recipe.sampling.steps, ours.recipe.sampling.guidance_scale) == (50, 4.0)
    h = w = SIZE // 2
    noise = image_noise([0, 1], (LATENT_CHANNELS, h, w))
    patched = Flux2KleinPipeline._patchify_latents(noise)
    steps = 3

    def theirs(guidance, **kwargs):
        return klein(prompt=PROMPTS, latents=patched.clone(), num_inference_steps=steps, guidance_scale=guidance,
                     height=SIZE, width=SIZE, output_type="pt", **kwargs).images

    default = ours.generate(PROMPTS, steps=steps, noise=noise)  # true CFG 4.0, the pipeline's default
    assert max_diff(default, theirs(4.0)) < PIXEL_ATOL
    sigmas = [1.0, 0.6, 0.3]
    assert max_diff(ours.generate(PROMPTS, guidance_scale=2.0, noise=noise, sigmas=sigmas),
                     theirs(2.0, sigmas=sigmas)) < PIXEL_ATOL
    # The comparison can fail: another guidance scale moves the images far beyond the tolerance.
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=2.0, noise=noise), default) > 0.05



def test_the_grid_is_the_pipelines_with_its_empirical_mu():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from flowmatch.sampling.diffusers_schedule import PipelineGrid
    from tests.tiny_pipelines_flux2 import FLUX2_SCHEDULER

    grid = PipelineGrid(FLUX2_SCHEDULER, "flux2")
    for seq_len, steps in ((64, 3), (1024, 28), (4096, 50)):
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
        scheduler.set_timesteps(steps, sigmas=[1 - i / steps for i in range(steps)],
                                mu=compute_empirical_mu(seq_len, steps))
        assert grid.grid(steps, seq_len=seq_len) == scheduler.sigmas.double().tolist()
    assert grid.mu(64) != compute_empirical_mu(64, 3)  # the config's linear mu is another one: the test can fail


def test_the_latent_layout_says_how_the_vae_normalises(tiny_flux2_pipeline):
    from flowmatch.encoders.autoencoder import STATISTICS_VAES
    from flowmatch.families import FAMILIES

    layout = FAMILIES["flux2"].latents
    assert (layout.channels, layout.pack, layout.patch_statistics) == (32, 2, True)
    configs = encoder_configs_from_pipeline(tiny_flux2_pipeline)  # no config factor overrides the statistics
    assert (configs.autoencoder.preset, configs.autoencoder.scaling_factor, configs.autoencoder.shift_factor) == (
        "config", None, None)
    assert "AutoencoderKLFlux2" in STATISTICS_VAES


def test_pipeline_latents_are_the_pipelines_patchified():
    from flowmatch.families.flux2 import pipeline_latents

    x = torch.randn(2, LATENT_CHANNELS, 6, 8)
    assert torch.equal(pipeline_latents(x), Flux2KleinPipeline._patchify_latents(x))


@pytest.mark.slow  # a LoRA file on each side of the tiny pipeline, per format: several seconds each
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_lora_check_agrees_for_every_format(tiny_flux2_pipeline, fmt, tmp_path):
    from flowmatch.engine.state import write_safetensors
    from flowmatch.families import family_of
    from flowmatch.families.convert import from_diffusers
    from flowmatch.lora_check import check_lora
    from flowmatch.models.convert.lora import to_lora_file
    from flowmatch.models.lora import LoraConfig
    from tests.test_lora_formats import adapted_model

    lora = LoraConfig(rank=4, alpha=8.0)
    cfg = from_diffusers(tiny_flux2_pipeline).cfg
    _, chosen, adapters = adapted_model(cfg, lora)
    file = tmp_path / f"{fmt}.safetensors"
    write_safetensors(file, *to_lora_file(adapters, chosen, lora, family_of(cfg).lora_formats[fmt], cfg))
    result = check_lora(file, tiny_flux2_pipeline, prompts=PROMPTS, steps=2, size=SIZE, guidance=3.0)
    print(f"flux2 {fmt}: reference {result.reference}, max diff {result.max_diff:.2e}, effect {result.effect:.2e}")
    assert result.format == fmt and result.passed, result.describe()
    assert result.reference == "diffusers", result.describe()  # every format loads through load_lora_weights
