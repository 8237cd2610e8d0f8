"""FLUX.2 [dev]'s own pipeline, Flux2Pipeline, beside klein's in the one flux2 family: its folder read by its
model_index.json class (Mistral-3 through its chat template with the system message, hidden states 10, 20 and 30
side by side, every one of the 512 positions seen, the guidance embedded), `Pipeline.from_diffusers` giving its
images with the same latents, steps, sigmas and guidance, and `flowmatch export` of a run conditioned by its
encoders writing a folder Flux2Pipeline loads and that gives the run's images, on the tiny random pipeline of
tests/tiny_pipelines_flux2dev.py. Klein's side is tests/test_flux2_pipeline.py's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, Flux2Pipeline

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.export import export
from flowmatch.families import FAMILIES, PIPELINES
from flowmatch.families.config import ModelConfig
from flowmatch.sampling.diffusers_schedule import PipelineGrid
from flowmatch.sampling.generate import image_noise
from flowmatch.training import train
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_train import tiny_recipe
from tests.tiny_pipelines_flux2 import FLUX2_SCHEDULER, LATENT_CHANNELS

SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2, 8x8 packed tokens
PROMPTS = ["a photo of a cat", "a red apple on a wooden table at night"]
#: Beyond 512 tokens with the system turn: truncated, as the pipeline truncates it.
LONG = "a red apple on a wooden table " * 80
PIXEL_ATOL = 1e-3
EMBED_ATOL = 1e-5


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory) -> Path:
    from tests.tiny_pipelines_flux2dev import save_flux2_dev_pipeline

    return save_flux2_dev_pipeline(tmp_path_factory.mktemp("tiny-flux2-dev"))


@pytest.fixture(scope="module")
def dev(dev_folder) -> Flux2Pipeline:
    pipe = Flux2Pipeline.from_pretrained(dev_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_folder_is_read_as_flux2_dev_and_encodes_as_encode_prompt(dev_folder, dev):
    """Bugs caught: the template's BOS doubled by the tokenizer's own, the system message or the layers not the
    pipeline's, truncation after the template's prefix instead of at 512 tokens in all, Pixtral's [IMG] left in a
    caption, Flux2Pipeline read with klein's settings (Qwen3's template and layers) or refused (one pipeline per
    family)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from flowmatch.families.flux2 import DEV_SYSTEM_MESSAGE

    assert DEV_SYSTEM_MESSAGE == SYSTEM_MESSAGE
    configs = encoder_configs_from_pipeline(dev_folder)
    assert (configs.pipeline_class, configs.family, configs.guidance_embed) == ("Flux2Pipeline", "flux2", True)
    (mistral,) = configs.text_encoders.encoders.values()
    assert (mistral.kind, mistral.model_class, mistral.stack_layers, mistral.max_length, mistral.padding) == (
        "decoder_llm", "Mistral3ForConditionalGeneration", [10, 20, 30], 512, "max_length")
    encoders = FrozenEncoders(configs.text_encoders, configs.autoencoder, image_channels=3, device="cpu")
    captions = [*PROMPTS, LONG, "", "a photo[IMG] of a cat"]  # the pipeline takes [IMG] out: PROMPTS[0]
    cond = encoders.encode_text(captions)
    with torch.no_grad():
        hidden, text_ids = dev.encode_prompt(captions)
    print(f"Flux2Pipeline prompt embeddings: max |flowmatch - diffusers| {(cond.hidden - hidden).abs().max():.2e}")
    assert cond.all_valid and cond.hidden.shape == hidden.shape == (5, 512, 48)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=EMBED_ATOL)
    # every row differs from the others: the comparison above can fail
    assert min((hidden[i] - hidden[j]).abs().max() for i in range(4) for j in range(i)) > 1e-2
    assert torch.equal(cond.hidden[4], cond.hidden[0])
    assert torch.equal(text_ids[0, :, 3], torch.arange(512)) and not text_ids[..., :3].any()


def test_from_diffusers_generates_the_pipelines_images(dev_folder, dev):
    """Bugs caught: the dev guidance not embedded (or a default other than the pipeline's 4.0), klein's schedule
    for Flux2Pipeline's (a classifier-free pass), the empirical mu or the float32 time rounding lost."""
    ours = Pipeline.from_diffusers(dev_folder, device="cpu")
    assert (ours.recipe.sampling.steps, ours.recipe.sampling.guidance_scale) == (50, 4.0)
    assert ours.config.guidance_embed and not ours.pipeline_grid.classifier_free
    noise = image_noise([0, 1], (LATENT_CHANNELS, SIZE // 2, SIZE // 2))
    patched = Flux2Pipeline._patchify_latents(noise)
    steps = 3

    def theirs(guidance, **kwargs):
        return dev(prompt=PROMPTS, latents=patched.clone(), num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, output_type="pt", **kwargs).images

    default = ours.generate(PROMPTS, steps=steps, noise=noise)  # guidance 4.0 embedded, the pipeline's default
    sigmas = [1.0, 0.6, 0.3]
    custom = ours.generate(PROMPTS, guidance_scale=2.0, noise=noise, sigmas=sigmas)
    diffs = [max_diff(default, theirs(4.0)), max_diff(custom, theirs(2.0, sigmas=sigmas))]
    print(f"Flux2Pipeline images: max |flowmatch - diffusers| {diffs[0]:.2e} (guidance 4, default sigmas), "
          f"{diffs[1]:.2e} (guidance 2, sigmas {sigmas})")
    assert max(diffs) < PIXEL_ATOL
    # The comparison can fail: another embedded guidance moves the images far beyond the tolerance.
    assert max_diff(ours.generate(PROMPTS, steps=steps, guidance_scale=2.0, noise=noise), default) > 0.05



def test_each_pipeline_class_has_its_family_schedule_and_export_choice():
    """Bugs caught: PIPELINES keeping one class per family, PipelineGrid given the family's default (klein's
    classifier-free) schedule for Flux2Pipeline, an export choosing the family's default pipeline for a dev model
    or a dev model exported as klein's with klein's encoders."""
    flux2, kontext = FAMILIES["flux2"], FAMILIES["kontext"]
    assert {name: entry.family.name for name, entry in PIPELINES.items() if entry.family is flux2} == {
        "Flux2KleinPipeline": "flux2", "Flux2Pipeline": "flux2"}
    grids = [PipelineGrid(FLUX2_SCHEDULER, name) for name in ("Flux2Pipeline", "Flux2KleinPipeline", "flux2")]
    assert [g.classifier_free for g in grids] == [False, True, True]
    assert grids[0].grid(4, seq_len=64) == grids[1].grid(4, seq_len=64)  # one empirical mu for both
    chosen = {(g, source): getattr(flux2.export_pipeline(g, source), "pipeline_class", None)
              for g in (False, True) for source in (None, "Flux2Pipeline", "Flux2KleinPipeline")}
    assert chosen == {(False, None): "Flux2KleinPipeline", (False, "Flux2Pipeline"): None,
                      (False, "Flux2KleinPipeline"): "Flux2KleinPipeline", (True, None): "Flux2Pipeline",
                      (True, "Flux2Pipeline"): "Flux2Pipeline", (True, "Flux2KleinPipeline"): None}
    # a family of one pipeline keeps it whatever the source: Kontext trained on FluxPipeline's encoders
    assert kontext.export_pipeline(True, "FluxPipeline").pipeline_class == "FluxKontextPipeline"


def _dev_recipe(folder: Path, shards: Path, run: Path, model: ModelConfig):
    """A tiny recipe of `model` conditioned by the dev pipeline's encoder, VAE and shift."""
    configs = encoder_configs_from_pipeline(folder)
    recipe = tiny_recipe(run, shards, **{"train.max_steps": 2, "train.batch_size": 2, "data.channels": 3,
                                         "data.resolution": SIZE, "sampling.steps": 1, "train.checkpoint_every": 2,
                                         "optim.lr": 0.01, "optim.schedule": "constant"})
    return dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                               autoencoder=configs.autoencoder, flow=configs.flow)


def _dev_run(folder: Path, shards: Path, run: Path) -> Path:
    """Two full fine-tuning steps of the dev pipeline's transformer with its encoder, VAE and shift."""
    train(_dev_recipe(folder, shards, run, ModelConfig(init_from=str(folder))))
    return run


def test_a_transformer_the_encoders_pipeline_cannot_run_exports_alone(dev_folder, tmp_path):
    """Bug caught: the export writing a Flux2Pipeline folder (or klein's, with Mistral-3 in it) for a transformer
    without a guidance embedding conditioned by Flux2Pipeline's encoders, which neither pipeline runs."""
    from flowmatch.export import _write_rest
    from flowmatch.flow import TimeSchedule

    klein_sized = ModelConfig(preset="tiny-flux2-klein-4b")  # no guidance embedding
    recipe = _dev_recipe(dev_folder, tmp_path / "shards", tmp_path / "run", klein_sized)
    files, notes = _write_rest(TimeSchedule(recipe.flow), tmp_path / "out", recipe, "Flux2Transformer2DModel",
                               "diffusers", [], FAMILIES["flux2"])
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == ["scheduler/scheduler_config.json"]
    assert any("transformer only" in n and "Flux2Pipeline's, which does not run its transformer (without a "
               "guidance embedding)" in n for n in notes), notes


@pytest.mark.slow  # training two steps, an export and both libraries generating: about 8 s
def test_a_run_on_its_encoders_exports_a_flux2_pipeline_folder(dev_folder, digit_shards, tmp_path):
    """Bugs caught: the export naming the family's default class (Flux2KleinPipeline, which runs no guidance
    embedding and another encoder), the folder's transformer not the run's.

    Both sides walk the pipeline's grid: Flux2Pipeline shifts any sigmas by its empirical mu, which no scheduler
    config changes, so flowmatch's own grid for the run (the flow section's shift) is not one it can walk."""
    run = _dev_run(dev_folder, digit_shards, tmp_path / "run")
    out = tmp_path / "out"
    summary = export(run, out, weights="raw", dtype="fp32")
    assert any("complete Flux2Pipeline folder" in n for n in summary.notes), summary.notes
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, Flux2Pipeline) and pipe.transformer.config.guidance_embeds
    pipe.set_progress_bar_config(disable=True)
    noise = image_noise([0, 1], (LATENT_CHANNELS, SIZE // 2, SIZE // 2))
    ours = Pipeline.from_diffusers(dev_folder, device="cpu")
    kw = dict(steps=3, guidance_scale=3.0, noise=noise)
    base = ours.generate(PROMPTS, **kw)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's trained weights
    want = ours.generate(PROMPTS, **kw)
    theirs = pipe(prompt=PROMPTS, latents=Flux2Pipeline._patchify_latents(noise), num_inference_steps=3,
                  guidance_scale=3.0, height=SIZE, width=SIZE, output_type="pt").images
    error, moved = max_diff(want, theirs), max_diff(want, base)
    print(f"exported Flux2Pipeline: max |flowmatch run - diffusers folder| {error:.2e}; training moved the images "
          f"by {moved:.2e}")
    assert error < PIXEL_ATOL and moved > 10 * PIXEL_ATOL


def test_the_recipe_encodes_as_the_pipeline_and_plans_the_released_encoder():
    """Bugs caught: the dev recipe's encoder drifting from Flux2Pipeline's settings (flowmatch.families.flux2), the
    planner's FLUX.2-dev text encoder missing or counted with its LM head tied to the embeddings (23.3B)."""
    from flowmatch.config import load_recipe
    from flowmatch.families.flux2 import DEV_TEXT_ENCODER
    from flowmatch.plan.frozen import text_encoder
    from tests.test_train import ROOT

    recipe = load_recipe(ROOT / "recipes" / "flux2-dev-lora.yaml", [])
    (name, encoder), = recipe.text_encoders.encoders.items()
    assert {k: getattr(encoder, k) for k in DEV_TEXT_ENCODER} == DEV_TEXT_ENCODER
    encoder.name_or_path = "black-forest-labs/FLUX.2-dev"  # from_init: the released pipeline, not in any cache here
    part, shape = text_encoder(name, encoder, "text_encoders.encoders.mistral3")
    assert (part.params, shape.hidden, shape.pooled, shape.tokens) == (24_011_361_280, 3 * 5120, 0, 512)
