"""flowmatch's Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler and pipelines: the grids as
flowmatch.sampling.diffusers_schedule states them, and the same latents from the same weights, noise and grid.
Also `Pipeline.generate(noise=...)`, the way to give both libraries the same starting latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.families.convert import from_diffusers
from flowmatch.flow import FlowConfig, TimeSchedule
from flowmatch.models import MMDiT
from flowmatch.sampling.diffusers_schedule import (
    PipelineGrid,
    diffusers_default_sigmas,
    diffusers_sigmas,
    mu_for,
    scheduler_config,
)
from flowmatch.sampling.generate import GenerationConfig, Pipeline, image_noise, sample_latents
from tests.interop_models import (
    CONTEXT_DIM,
    FLUX_VAE_FACTOR,
    POOLED_DIM,
    diffusers_model,
    one_thread,  # noqa: F401 - applies the module-wide fixture
)

ROOT = Path(__file__).resolve().parents[1]
#: The scheduler config of black-forest-labs/FLUX.1-dev (scheduler/scheduler_config.json); `shift` is unused
#: with dynamic shifting.
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
GRID_ATOL = 1e-6  # diffusers builds its grid in float32
PIXEL_ATOL = 1e-3


def _sigmas(scheduler, steps, **kwargs) -> torch.Tensor:
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler.sigmas.double()


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_static_shift_grid_with_our_sigmas_is_ours_and_the_default_is_not(steps):
    schedule = TimeSchedule(FlowConfig(shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config(schedule))
    ours = schedule.sampling_grid(steps, seq_len=1024)
    torch.testing.assert_close(_sigmas(scheduler, steps, sigmas=diffusers_sigmas(steps)),
                               ours, rtol=0, atol=GRID_ATOL)
    # StableDiffusion3Pipeline's default: set_timesteps(N) alone, a different grid.
    default = _sigmas(scheduler, steps)
    torch.testing.assert_close(default, torch.tensor(diffusers_default_sigmas(steps, 3.0), dtype=torch.float64),
                               rtol=0, atol=GRID_ATOL)
    assert steps == 1 or (default - ours).abs().max() > 0.05  # one step is 1 -> 0 on both


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096])
def test_flux_dynamic_shift_default_grid_is_our_sequence_mode(seq_len):
    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    # What FluxPipeline does: sigmas linspace(1, 1/N, N), mu linear in the image sequence length.
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    flux_grid = _sigmas(scheduler, steps, sigmas=diffusers_sigmas(steps), mu=mu)
    schedule = TimeSchedule(FlowConfig(shift_mode="sequence"))  # FLUX's base/max lengths and shifts by default
    torch.testing.assert_close(flux_grid, schedule.sampling_grid(steps, seq_len=seq_len), rtol=0, atol=GRID_ATOL)
    assert mu == pytest.approx(mu_for(schedule, seq_len), abs=1e-12)
    # Our scheduler settings for that mode are FLUX's.
    config = scheduler_config(schedule)
    assert {k: config[k] for k in FLUX_SCHEDULER if k != "shift"} == {k: v for k, v in FLUX_SCHEDULER.items()
                                                                      if k != "shift"}


def test_modes_without_a_diffusers_counterpart_fix_the_shift_or_pass_mu():
    schedule = TimeSchedule(FlowConfig(shift=2.0, shift_mode="resolution"))
    with pytest.raises(ValueError, match="image sequence length"):
        scheduler_config(schedule)
    steps, seq_len = 5, 1024
    ours = schedule.sampling_grid(steps, seq_len=seq_len)
    static = FlowMatchEulerDiscreteScheduler(**scheduler_config(schedule, seq_len))
    torch.testing.assert_close(_sigmas(static, steps, sigmas=diffusers_sigmas(steps)), ours, rtol=0, atol=GRID_ATOL)
    dynamic = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    torch.testing.assert_close(_sigmas(dynamic, steps, sigmas=diffusers_sigmas(steps), mu=mu_for(schedule, seq_len)),
                               ours, rtol=0, atol=GRID_ATOL)


def _text(batch: int, length: int, seed: int = 0) -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(batch, length, CONTEXT_DIM, generator=g),
                        torch.ones(batch, length, dtype=torch.bool), torch.randn(batch, POOLED_DIM, generator=g))
    null = Conditioning(torch.randn(1, length, CONTEXT_DIM, generator=g), torch.ones(1, length, dtype=torch.bool),
                        torch.randn(1, POOLED_DIM, generator=g))
    return cond, null


SD3_CASE = dict(steps=6, guidance=2.0, h=8, w=12)


def sd3_pipeline_latents(transformer, config: dict, cond: Conditioning, null: Conditioning, noise, **kwargs):
    """StableDiffusion3Pipeline's latents for SD3_CASE from the given embeddings and noise (no encoders, no VAE)."""
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**config),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    c = SD3_CASE
    return pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled,
                negative_prompt_embeds=null.hidden.expand(len(cond), -1, -1),
                negative_pooled_prompt_embeds=null.pooled.expand(len(cond), -1), latents=noise.clone(),
                num_inference_steps=c["steps"], guidance_scale=c["guidance"], height=c["h"] * 8, width=c["w"] * 8,
                output_type="latent", **kwargs).images


def test_sd3_pipeline_with_our_sigmas_gives_our_euler_latents():
    transformer = diffusers_model("sd3.5-medium", out_channels=4)
    schedule = TimeSchedule(FlowConfig(shift=3.0))  # SD3's scheduler shift
    steps, h, w = SD3_CASE["steps"], SD3_CASE["h"], SD3_CASE["w"]
    cond, null = _text(2, 7)
    noise = image_noise([0, 1], (4, h, w))
    ours, nfe = sample_latents(from_diffusers(transformer), cond, null, noise, steps=steps, solver="euler",
                               guidance_scale=SD3_CASE["guidance"], shift=schedule.shift_for(h * w // 4))
    assert nfe == steps

    def theirs(**kwargs):
        return sd3_pipeline_latents(transformer, scheduler_config(schedule), cond, null, noise, **kwargs)

    assert (theirs(sigmas=diffusers_sigmas(steps)) - ours).abs().max() < PIXEL_ATOL
    assert (theirs() - ours).abs().max() > 100 * PIXEL_ATOL  # the default grid is another grid


def test_pipeline_grid_removes_the_float32_timestep_drift_of_the_sd3_medium_layout():
    """The tiny SD3-medium layout (no QK-norm) is sensitive enough to t that flowmatch's float64 grid ends more
    than 1e-3 from diffusers' float32 one; walking the scheduler's own grid (PipelineGrid, which
    Pipeline.from_diffusers uses) brings it back under 1e-3, with our sigmas and with the pipeline's default."""
    transformer = diffusers_model("sd3-medium", out_channels=4)
    config = scheduler_config(TimeSchedule(FlowConfig(shift=3.0)))
    steps, h, w = SD3_CASE["steps"], SD3_CASE["h"], SD3_CASE["w"]
    cond, null = _text(2, 7)
    noise = image_noise([0, 1], (4, h, w))
    ours = from_diffusers(transformer)
    grid = PipelineGrid(config, "sd3")

    def sample(sigmas=None, exact=True):
        latents, _ = sample_latents(ours, cond, null, noise, steps=steps, solver="euler",
                                    guidance_scale=SD3_CASE["guidance"], shift=3.0,
                                    grid=grid.grid(steps, seq_len=h * w // 4, sigmas=sigmas) if exact else None)
        return latents

    sigmas = diffusers_sigmas(steps)
    reference = sd3_pipeline_latents(transformer, config, cond, null, noise, sigmas=sigmas)
    assert (sample(sigmas, exact=False) - reference).abs().max() > PIXEL_ATOL  # float64 grid: the drift
    assert (sample(sigmas) - reference).abs().max() < PIXEL_ATOL
    assert (sample() - sd3_pipeline_latents(transformer, config, cond, null, noise)).abs().max() < PIXEL_ATOL


def test_flux_dev_pipeline_default_grid_gives_our_euler_latents():
    transformer = diffusers_model("flux-dev")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance, (h, w) = 5, 3.5, (8, 12)
    cond, _ = _text(2, 6)
    noise = image_noise([0, 1], (4, h, w))
    packed = FluxPipeline._pack_latents(noise, 2, 4, h, w)
    latents = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, latents=packed,
                   num_inference_steps=steps, guidance_scale=guidance, height=h * FLUX_VAE_FACTOR,
                   width=w * FLUX_VAE_FACTOR, output_type="latent").images
    theirs = FluxPipeline._unpack_latents(latents, h * FLUX_VAE_FACTOR, w * FLUX_VAE_FACTOR, FLUX_VAE_FACTOR)
    # FLUX-dev's distilled guidance is a model input, not classifier-free guidance.
    cond.extra["guidance"] = torch.full((2,), guidance)
    schedule = TimeSchedule(FlowConfig(shift_mode="sequence"))
    ours, _ = sample_latents(from_diffusers(transformer), cond, None, noise, steps=steps, solver="euler",
                             guidance_scale=None, shift=schedule.shift_for(h * w // 4))
    assert (theirs - ours).abs().max() < PIXEL_ATOL


@pytest.fixture(scope="module")
def digits_pipeline() -> Pipeline:
    """The digits recipe's pipeline with a tiny random model (no training needed to test the sampler's inputs)."""
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", ['model.preset="tiny"'])
    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels)
    recipe.model = encoders.fill_model_config(recipe.model)
    torch.manual_seed(0)
    model = MMDiT(recipe.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Pipeline(model.eval(), encoders, GenerationConfig.of(recipe))


def test_generate_starts_from_the_given_noise(digits_pipeline):
    pipe, prompts = digits_pipeline, ["a handwritten 3", "a handwritten 7"]
    seeded = pipe.generate(prompts, steps=3, seed=5)
    c, h, w = pipe.latent_shape()
    noise = image_noise([5, 6], (c, h, w))
    assert torch.equal(pipe.generate(prompts, steps=3, noise=noise), seeded)
    assert not torch.allclose(pipe.generate(prompts, steps=3, noise=-noise), seeded, atol=1e-3)
    # The noise's size sets the image size.
    assert pipe.generate(prompts, steps=2, noise=torch.randn(2, c, 12, 4)).shape == (2, 1, 12, 4)
    with pytest.raises(ValueError, match=r"noise must be \(B=2, 1, 8, 8\)"):
        pipe.generate(prompts, steps=2, noise=torch.randn(3, c, h, w))
    with pytest.raises(ValueError, match=r"noise must be \(B, C, h, w\)"):
        pipe.generate(prompts, steps=2, noise=torch.randn(c, h, w))
