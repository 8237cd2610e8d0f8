"""Qwen-Image LoRA and export end to end on the tiny random QwenImagePipeline (tests/tiny_pipelines_qwen.py):
`model.init_from` the pipeline folder, two steps of adapters with its Qwen2.5-VL encoder, VAE and shift on the
digits (as 32x32 RGB), `flowmatch export --lora` into `QwenImagePipeline.load_lora_weights`, and `--merge` as a
complete pipeline folder `DiffusionPipeline.from_pretrained` loads; both generate flowmatch's images from the same
noise, steps, negative prompt and true CFG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline

from flowmatch import Pipeline
from flowmatch.export import export
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_finetune_pipelines import lora_run
from tests.tiny_pipelines_qwen import LATENT_CHANNELS

SIZE = 32
VAE_FACTOR = 4
PROMPTS = ["a handwritten 3", "a photo of a cat"]
NEGATIVE = "blurry"
PIXEL_ATOL = 1e-3
STEPS, GUIDANCE = 3, 3.0

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


@pytest.fixture(scope="module")
def qwen_lora_run(tiny_qwen_pipeline, digit_shards, tmp_path_factory) -> Path:
    """Two steps of rank-4, alpha-8 adapters on the pipeline's transformer, with its encoder, VAE and shift."""
    return lora_run(tiny_qwen_pipeline, tmp_path_factory.mktemp("qwen-lora") / "run", digit_shards)


def _generate(pipe, latents, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, negative_prompt=NEGATIVE, true_cfg_scale=GUIDANCE, latents=latents,
                num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt", **kwargs).images


def test_lora_and_merged_exports_generate_flowmatchs_images(qwen_lora_run, tiny_qwen_pipeline, tmp_path):
    """Bugs caught: adapters exported under the wrong diffusers names (load_lora_weights would skip them), a
    merged export that loses them, an export folder whose encoder or VAE is not the run's."""
    lora = export(qwen_lora_run, tmp_path / "lora", lora=True, weights="raw")
    assert lora.files == [tmp_path / "lora" / "pytorch_lora_weights.safetensors"]
    merged_summary = export(qwen_lora_run, tmp_path / "merged", merge=True, weights="raw", dtype="fp32")
    assert any("complete QwenImagePipeline folder" in n for n in merged_summary.notes), merged_summary.notes
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]

    h = w = SIZE // VAE_FACTOR
    noise = torch.randn(len(PROMPTS), LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(0))
    packed = QwenImagePipeline._pack_latents(noise, len(PROMPTS), LATENT_CHANNELS, h, w)
    ours = Pipeline.from_diffusers(tiny_qwen_pipeline, device="cpu")
    base = ours.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, noise=noise, negative_prompt=NEGATIVE)
    ours.model = Pipeline.from_checkpoint(qwen_lora_run, ema=False, device="cpu").model  # the run's own LoRA model
    want = ours.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, noise=noise, negative_prompt=NEGATIVE)

    theirs = QwenImagePipeline.from_pretrained(tiny_qwen_pipeline)
    theirs.load_lora_weights(tmp_path / "lora")
    got = _generate(theirs, packed.clone())
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, QwenImagePipeline)
    got_merged = _generate(merged, packed.clone())
    err, err_merged, moved = ((got - want).abs().max().item(), (got_merged - want).abs().max().item(),
                              (base - want).abs().max().item())
    print(f"QwenImagePipeline: LoRA images max |diffusers - flowmatch| {err:.2e}, merged {err_merged:.2e}; "
          f"the adapters move the images by {moved:.2e}")
    assert err < PIXEL_ATOL and err_merged < PIXEL_ATOL
    assert moved > 10 * PIXEL_ATOL  # the adapters trained enough to matter
