"""Qwen-Image's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`). The release is published in
diffusers' module names only, and every tool names LoRA modules by them, split q/k/v included:

    diffusers  transformer.transformer_blocks.0.attn.to_q.lora_A.weight (the peft header)
    comfyui    diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight / .alpha (ComfyUI's single-file
               saves keep diffusers' names under ``model.diffusion_model.``)
    kohya      lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight / .alpha (musubi-tuner and sd-scripts)

diffusers' QwenImageLoraLoaderMixin converts the last two itself (``_convert_non_diffusers_qwen_lora_to_diffusers``:
the ``diffusion_model.`` and ``lora_unet_`` prefixes, the underscored names, alpha folded into the factors)."""

from __future__ import annotations

from flowmatch.families.qwen_image import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = released_formats(convert.diffusers_rules, convert.original_rules)
