"""FLUX.1 Kontext LoRA end to end on the tiny random FluxKontextPipeline of tests/tiny_pipelines_kontext.py:
`model.init_from` the pipeline folder (read as the Kontext family), adapters trained on paired samples (target,
reference image, instruction) with its encoders, `flowmatch export --lora` into
`FluxKontextPipeline.load_lora_weights` and `--merge` as a complete folder `DiffusionPipeline.from_pretrained`
loads as a FluxKontextPipeline, both giving flowmatch's images from the same latents and reference images."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline
from PIL import Image

from flowmatch import Pipeline
from flowmatch.data.shardformat import ShardSink, reference_ext
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.config import ModelConfig
from flowmatch.models.lora import LoraConfig
from flowmatch.training import train
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_train import tiny_recipe
from tests.tiny_pipelines import LATENT_CHANNELS

SIZE = 32
PROMPTS = ["add one", "a photo of a cat"]
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


def _png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_edit_pairs(out: Path, count: int = 8) -> Path:
    """``count`` paired samples: a random 32x32 RGB reference, its target (the reference mirrored) and an
    instruction."""
    g = torch.Generator().manual_seed(0)
    with ShardSink(out, prefix="train", shard_size=count) as sink:
        for i in range(count):
            ref = torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8)
            sink.write(f"p{i:02d}", {"png": _png(ref.flip(-1)), reference_ext(0, "png"): _png(ref),
                                     "txt": "mirror the image"})
    return out


def kontext_lora_run(pipeline: Path, run: Path, shards: Path) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the Kontext pipeline's transformer, with its encoders, VAE and
    shift, on paired samples; the architecture (references included) comes from the pipeline's transformer."""
    configs = encoder_configs_from_pipeline(pipeline)
    recipe = tiny_recipe(run, shards, **{"train.max_steps": 2, "train.batch_size": 4, "data.channels": 3,
                                         "data.resolution": SIZE, "data.paired": True, "sampling.steps": 1,
                                         "model.preset": "tiny-flux-kontext-dev",
                                         "optim.lr": 0.05, "optim.schedule": "constant"})
    model = ModelConfig(init_from=str(pipeline), lora=LoraConfig(rank=4, alpha=8))
    train(dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                              autoencoder=configs.autoencoder, flow=configs.flow))
    return run


def test_kontext_lora_round_trips_through_load_lora_weights_and_a_merged_export(tiny_kontext_pipeline, tmp_path):
    run = kontext_lora_run(tiny_kontext_pipeline, tmp_path / "run", write_edit_pairs(tmp_path / "shards"))
    out = tmp_path / "out"
    assert export(run, out / "lora", lora=True, weights="raw").files == [out / "lora" /
                                                                          "pytorch_lora_weights.safetensors"]
    merged_summary = export(run, out / "merged", merge=True, weights="raw")
    assert any("complete FluxKontextPipeline folder" in n for n in merged_summary.notes), merged_summary.notes
    assert json.loads((out / "merged" / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(PROMPTS), LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=g)
    refs = torch.rand(len(PROMPTS), 3, SIZE, SIZE, generator=g)
    ours = Pipeline.from_diffusers(tiny_kontext_pipeline, device="cpu")
    kw = dict(images=refs, steps=STEPS, guidance_scale=GUIDANCE, noise=noise, auto_resize=False)
    base_images = ours.generate(PROMPTS, **kw)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's own LoRA model
    assert ours.model.cfg.references == 1
    want = ours.generate(PROMPTS, **kw)

    packed = FluxKontextPipeline._pack_latents(noise, len(PROMPTS), LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    theirs = FluxKontextPipeline.from_pretrained(tiny_kontext_pipeline)
    theirs.load_lora_weights(out / "lora")
    merged = DiffusionPipeline.from_pretrained(out / "merged")
    assert isinstance(merged, FluxKontextPipeline)
    errors = []
    for pipe in (theirs, merged):
        pipe.set_progress_bar_config(disable=True)
        got = pipe(image=refs, prompt=PROMPTS, latents=packed.clone(), num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
                   output_type="pt").images
        errors.append((got - want).abs().max().item())
    moved = (base_images - want).abs().max().item()
    print(f"FluxKontextPipeline: LoRA images max |diffusers - flowmatch| {errors[0]:.2e}, merged {errors[1]:.2e}; "
          f"the adapters move the images by {moved:.2e}")
    assert max(errors) < PIXEL_ATOL
    assert moved > 10 * PIXEL_ATOL  # the adapters trained enough to matter
