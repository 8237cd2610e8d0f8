"""FLUX.2's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split q/k/v, the single
blocks' fused ``attn.to_qkv_mlp_proj``), ComfyUI's and kohya's (BFL's fused ``double_blocks.N.img_attn.qkv`` and
``single_blocks.N.linear1``)."""

from __future__ import annotations

from flowmatch.families.flux2 import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = released_formats(convert.diffusers_rules, convert.original_rules)
