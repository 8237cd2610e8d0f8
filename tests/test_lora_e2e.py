"""LoRA end to end on every family's tiny random diffusers pipeline, one row each: trained from the pipeline folder,
exported into the pipeline class's `load_lora_weights` and merged into a complete folder, both giving flowmatch's
images (tests/lora_e2e.py runs the same checks for every row; a row says how diffusers' class is called)."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import (
    ChromaPipeline,
    Flux2KleinPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    QwenImageEditPipeline,
    QwenImagePipeline,
)
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image

from flowmatch.families import diffusers_pipeline
from flowmatch.families.qwen_image_edit import reference_size
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.lora_e2e import SIZE, Inputs, Row, check_round_trip, quiet, write_edit_pairs

pytestmark = pytest.mark.slow  # whole pipelines: training, export, and both libraries generating


def packed(pack, noise: torch.Tensor) -> torch.Tensor:
    """FLUX-style 2x2-packed latents (B, h w / 4, 4 C) of ``noise`` (B, C, h, w)."""
    b, c, h, w = noise.shape
    return pack(noise, b, c, h, w)


def plain(pipe, x: Inputs) -> torch.Tensor:
    """StableDiffusion3Pipeline, Lumina2Pipeline: the latents as flowmatch takes them."""
    return quiet(pipe, x.prompts, latents=x.noise, num_inference_steps=x.steps, guidance_scale=x.guidance)


def flux(pipe, x: Inputs) -> torch.Tensor:
    return quiet(pipe, x.prompts, latents=packed(FluxPipeline._pack_latents, x.noise), num_inference_steps=x.steps,
                 guidance_scale=x.guidance)


def flux2(pipe, x: Inputs) -> torch.Tensor:
    return quiet(pipe, prompt=x.prompts, latents=Flux2KleinPipeline._patchify_latents(x.noise),
                 num_inference_steps=x.steps, guidance_scale=x.guidance)


def zimage(pipe, x: Inputs) -> torch.Tensor:
    """ZImagePipeline's guidance_scale is flowmatch's classifier-free scale less 1 (its family's guidance_offset)."""
    offset = diffusers_pipeline("ZImagePipeline").guidance_offset
    return quiet(pipe, list(x.prompts), latents=x.noise, num_inference_steps=x.steps,
                 guidance_scale=x.guidance + offset)


def chroma(pipe, x: Inputs) -> torch.Tensor:
    """ChromaPipeline given its prompt embeddings with a boolean mask (see tests/test_chroma_pipeline.py)."""
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(x.prompts, negative_prompt=[""] * len(x.prompts))
    return quiet(pipe, prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                 negative_prompt_attention_mask=negative_mask.bool(),
                 latents=packed(ChromaPipeline._pack_latents, x.noise), num_inference_steps=x.steps,
                 guidance_scale=x.guidance)


def qwen(pipe, x: Inputs) -> torch.Tensor:
    return quiet(pipe, x.prompts, negative_prompt=x.negative, true_cfg_scale=x.guidance,
                 latents=packed(QwenImagePipeline._pack_latents, x.noise), num_inference_steps=x.steps)


def kontext(pipe, x: Inputs) -> torch.Tensor:
    return quiet(pipe, image=x.references, prompt=x.prompts, latents=packed(FluxKontextPipeline._pack_latents, x.noise),
                 num_inference_steps=x.steps, guidance_scale=x.guidance, max_area=SIZE * SIZE, _auto_resize=False)


def qwen_edit(pipe, x: Inputs) -> torch.Tensor:
    """One call per prompt: the pipeline shows its VL encoder the resized reference only for a single image."""
    return torch.cat([quiet(pipe, image=x.references[i], prompt=x.prompts[i], negative_prompt=x.negative,
                            true_cfg_scale=x.guidance, num_inference_steps=x.steps,
                            latents=packed(QwenImageEditPipeline._pack_latents, x.noise[i:i + 1]))
                      for i in range(len(x.prompts))])


def qwen_edit_sizes(monkeypatch, ours) -> None:
    """References kept at 32x32 on both sides: the pipeline's area SIZE * SIZE instead of a megapixel."""
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: original(SIZE * SIZE, ratio))
    ours.reference_size = functools.partial(reference_size, area=SIZE * SIZE)


def pil_references(g: torch.Generator) -> list[Image.Image]:
    return [Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]


def tensor_references(g: torch.Generator) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=g)  # (B, 3, H, W) in [0, 1]


FORMATS = ("diffusers", "comfyui", "kohya")
ROWS = [  # name, tiny preset, pipeline fixture, diffusers class, how diffusers' class is called
    Row("sd3", "tiny-sd3-medium", "tiny_sd3_pipeline", "StableDiffusion3Pipeline", plain, formats=FORMATS),
    Row("flux-dev", "tiny-flux-dev", "tiny_flux_pipeline", "FluxPipeline", flux, formats=FORMATS),
    Row("flux2-klein", "tiny-flux2-klein-4b", "tiny_flux2_pipeline", "Flux2KleinPipeline", flux2),
    Row("lumina2", "tiny-lumina2", "tiny_lumina2_pipeline", "Lumina2Pipeline", plain),
    Row("zimage", "tiny-zimage", "tiny_zimage_pipeline", "ZImagePipeline", zimage),
    Row("chroma", "tiny-chroma", "tiny_chroma_pipeline", "ChromaPipeline", chroma),
    Row("qwen-image", "tiny-qwen-image", "tiny_qwen_pipeline", "QwenImagePipeline", qwen, negative="blurry"),
    Row("kontext", "tiny-flux-kontext-dev", "tiny_kontext_pipeline", "FluxKontextPipeline", kontext,
        references=tensor_references, ours=dict(auto_resize=False)),
    Row("qwen-image-edit", "tiny-qwen-image-edit", "tiny_qwen_edit_pipeline", "QwenImageEditPipeline", qwen_edit,
        references=pil_references, negative="blurry", setup=qwen_edit_sizes),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_lora_round_trips_through_load_lora_weights_and_a_merged_export(row, request, tmp_path, monkeypatch):
    pipeline = request.getfixturevalue(row.fixture)
    shards = write_edit_pairs(tmp_path / "shards") if row.edit else request.getfixturevalue("digit_shards")
    check_round_trip(row, pipeline, shards, tmp_path, monkeypatch)
