"""Chroma's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split q/k/v and MLP input on
ChromaTransformer2DModel's modules), ComfyUI's and kohya's on the release's single-file modules, which are FLUX.1's
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``) without per-block modulation. diffusers'
ChromaPipeline reads LoRAs through FLUX's loader (FluxLoraLoaderMixin), so it converts Chroma's kohya and ComfyUI
files with FLUX.1's converter."""

from __future__ import annotations

from flowmatch.families.chroma import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = released_formats(convert.diffusers_rules, convert.original_rules)
