"""Qwen-Image-Edit LoRA end to end on the tiny random QwenImageEditPipeline of tests/tiny_pipelines_qwen.py:
`model.init_from` the pipeline folder (read as the qwen_image_edit family), adapters trained on paired samples
(target, reference image, instruction) with its VL encoder seeing each reference, `flowmatch export --lora` into
`QwenImageEditPipeline.load_lora_weights` and `--merge` as a complete folder `DiffusionPipeline.from_pretrained`
loads as a QwenImageEditPipeline (processor included), both giving flowmatch's images from the same latents,
reference images, negative prompt and true CFG."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImageEditPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.export import export
from flowmatch.families.config import ModelConfig
from flowmatch.families.qwen_image_edit import reference_size
from flowmatch.models.lora import LoraConfig
from flowmatch.training import train
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_kontext_lora import write_edit_pairs
from tests.test_train import tiny_recipe
from tests.tiny_pipelines_qwen import LATENT_CHANNELS

SIZE = 32
VAE_FACTOR = 4
PROMPTS = ["mirror the image", "a photo of a cat"]
NEGATIVE = "blurry"
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


def qwen_edit_lora_run(pipeline: Path, run: Path, shards: Path) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the edit pipeline's transformer, with its VL encoder, VAE and
    shift, on paired samples; the architecture (its reference included) comes from the pipeline's transformer."""
    configs = encoder_configs_from_pipeline(pipeline)
    recipe = tiny_recipe(run, shards, **{"train.max_steps": 2, "train.batch_size": 4, "data.channels": 3,
                                         "data.resolution": SIZE, "data.paired": True, "sampling.steps": 1,
                                         "model.preset": "tiny-qwen-image-edit",
                                         "optim.lr": 0.05, "optim.schedule": "constant"})
    model = ModelConfig(init_from=str(pipeline), lora=LoraConfig(rank=4, alpha=8))
    train(dataclasses.replace(recipe, model=model, text_encoders=configs.text_encoders,
                              autoencoder=configs.autoencoder, flow=configs.flow))
    return run


def test_qwen_edit_lora_round_trips_through_load_lora_weights_and_a_merged_export(tiny_qwen_edit_pipeline, tmp_path,
                                                                                   monkeypatch):
    run = qwen_edit_lora_run(tiny_qwen_edit_pipeline, tmp_path / "run", write_edit_pairs(tmp_path / "shards"))
    out = tmp_path / "out"
    assert export(run, out / "lora", lora=True, weights="raw").files == [out / "lora" /
                                                                          "pytorch_lora_weights.safetensors"]
    merged_summary = export(run, out / "merged", merge=True, weights="raw", dtype="fp32")
    assert any("complete QwenImageEditPipeline folder" in n for n in merged_summary.notes), merged_summary.notes
    assert json.loads((out / "merged" / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"

    # References kept at 32x32 on both sides: the pipeline's area SIZE * SIZE instead of a megapixel.
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: original(SIZE * SIZE, ratio))
    g = torch.Generator().manual_seed(0)
    h = w = SIZE // VAE_FACTOR
    noise = torch.randn(len(PROMPTS), LATENT_CHANNELS, h, w, generator=g)
    refs = [Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).byte().numpy()) for _ in PROMPTS]
    ours = Pipeline.from_diffusers(tiny_qwen_edit_pipeline, device="cpu")
    ours.reference_size = functools.partial(reference_size, area=SIZE * SIZE)
    kw = dict(images=refs, steps=STEPS, guidance_scale=GUIDANCE, noise=noise, negative_prompt=NEGATIVE)
    base_images = ours.generate(PROMPTS, **kw)
    ours.model = Pipeline.from_checkpoint(run, ema=False, device="cpu").model  # the run's own LoRA model
    assert ours.model.cfg.references == 1
    want = ours.generate(PROMPTS, **kw)

    theirs = QwenImageEditPipeline.from_pretrained(tiny_qwen_edit_pipeline)
    theirs.load_lora_weights(out / "lora")
    merged = DiffusionPipeline.from_pretrained(out / "merged")
    assert isinstance(merged, QwenImageEditPipeline)
    errors = []
    for pipe in (theirs, merged):
        pipe.set_progress_bar_config(disable=True)
        # One call per prompt: the pipeline shows its VL encoder the resized reference only for a single image.
        got = torch.cat([pipe(image=refs[i], prompt=PROMPTS[i], negative_prompt=NEGATIVE, true_cfg_scale=GUIDANCE,
                              latents=QwenImageEditPipeline._pack_latents(noise[i:i + 1], 1, LATENT_CHANNELS, h, w),
                              num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt").images
                         for i in range(len(PROMPTS))])
        errors.append((got - want).abs().max().item())
    moved = (base_images - want).abs().max().item()
    print(f"QwenImageEditPipeline: LoRA images max |diffusers - flowmatch| {errors[0]:.2e}, merged "
          f"{errors[1]:.2e}; the adapters move the images by {moved:.2e}")
    assert max(errors) < PIXEL_ATOL
    assert moved > 10 * PIXEL_ATOL  # the adapters trained enough to matter
