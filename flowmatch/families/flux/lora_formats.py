"""FLUX.1's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split q/k/v and MLP
input), ComfyUI's and kohya's (BFL's fused ``double_blocks.N.img_attn.qkv`` and ``single_blocks.N.linear1``), and,
read only, the layouts other FLUX trainers write: fal's and ai-toolkit's peft keys on BFL modules
(``base_model.model.``), OneTrainer's ``lora_transformer_`` and SimpleTuner's LyCORIS-named ``lycoris_`` on
diffusers modules."""

from __future__ import annotations

from flowmatch.families.flux import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

FORMATS: dict[str, LoraFormat] = {
    **released_formats(convert.diffusers_rules, convert.original_rules),
    "fal": LoraFormat("fal", convert.original_rules, prefix="base_model.model", alpha_keys=False, writes=False),
    "onetrainer": LoraFormat("onetrainer", convert.diffusers_rules, prefix="lora_transformer", style="kohya",
                             writes=False),
    "lycoris": LoraFormat("lycoris", convert.diffusers_rules, prefix="lycoris", style="kohya", writes=False),
}
