"""Z-Image's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split
``attention.to_q`` / ``to_k`` / ``to_v``), and ComfyUI's and kohya's on the release single file's modules (fused
``attention.qkv``, ``attention.out``)."""

from __future__ import annotations

from flowmatch.families.zimage import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = released_formats(convert.diffusers_rules, convert.original_rules)
