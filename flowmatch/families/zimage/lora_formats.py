"""Z-Image's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`):

    diffusers        transformer.layers.0.attention.to_q.lora_A.weight (the peft header): split q/k/v, as
                     ZImageTransformer2DModel names its modules
    comfyui          diffusion_model.layers.0.attention.to_q.lora_down.weight / .lora_up.weight / .alpha: the same
                     split modules under ComfyUI's prefix and factor names
    kohya            lora_unet_layers_0_attention_qkv.lora_down.weight / ... / .alpha: the release single file's
                     modules (fused ``attention.qkv``, ``attention.out``)
    comfyui-release  (read only) diffusion_model.layers.0.attention.qkv...: the release's fused modules

The comfyui file names diffusers' modules because that is the one layout both tools apply: diffusers' Z-Image
converter (``_convert_non_diffusers_z_image_lora_to_diffusers``, diffusers 0.42.1) only strips the prefix and
renames the factors, so a file on the release's fused ``attention.qkv`` loads its other modules and leaves the
attention out (a partial LoRA with no error: ``flowmatch lora check`` measured a 0.78 difference on the tiny
pipeline). The split layout is the one that converter was written for, as Z-Image LoRAs from other trainers
use it; ComfyUI is not installed where flowmatch is tested, so its reading of these files is not checked here.
"""

from __future__ import annotations

from flowmatch.families.zimage import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

_RELEASED = released_formats(convert.diffusers_rules, convert.original_rules)
FORMATS: dict[str, LoraFormat] = {
    "diffusers": _RELEASED["diffusers"],
    "comfyui": LoraFormat("comfyui", convert.diffusers_rules, prefix="diffusion_model", style="comfyui",
                          tool="ComfyUI's LoraLoader and diffusers' ZImagePipeline.load_lora_weights"),
    "kohya": _RELEASED["kohya"],
    "comfyui-release": LoraFormat("comfyui-release", convert.original_rules, prefix="diffusion_model",
                                  style="comfyui", writes=False, tool="ComfyUI's LoraLoader"),
}
