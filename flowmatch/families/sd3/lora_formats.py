"""SD3's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split q/k/v), ComfyUI's and
kohya's (the release's fused ``joint_blocks.N.x_block.attn.qkv``), and, read only, the layouts ComfyUI's SD3 key
map accepts from other trainers (comfy/lora.py: ``base_model.model.`` peft keys, OneTrainer's
``lora_transformer_``)."""

from __future__ import annotations

from flowmatch.families.sd3 import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = {
    **released_formats(convert.diffusers_rules, convert.original_rules),
    "peft": LoraFormat("peft", convert.diffusers_rules, prefix="base_model.model", alpha_keys=False, writes=False),
    "onetrainer": LoraFormat("onetrainer", convert.diffusers_rules, prefix="lora_transformer", style="kohya",
                             writes=False),
}
