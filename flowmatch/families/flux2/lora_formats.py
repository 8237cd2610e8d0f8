"""FLUX.2's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`): diffusers' (split q/k/v, the single
blocks' fused ``attn.to_qkv_mlp_proj``), ComfyUI's and kohya's (BFL's fused ``double_blocks.N.img_attn.qkv`` and
``single_blocks.N.linear1``).

The comfyui file is ``diffusion_model.<BFL module>.lora_A.weight`` / ``.lora_B.weight`` with alpha / rank folded
into B and no ``.alpha`` keys, the layout ai-toolkit writes and both tools read. diffusers' FLUX.2 loader (diffusers
0.42.1) sends any file with ``lora_down`` names to its kohya converter, which reads no ``diffusion_model.`` key
(``Flux2KleinPipeline.load_lora_weights`` then loads nothing, with a log line only), and its ``diffusion_model.``
converter refuses any key it does not convert, alphas included. ComfyUI reads either factor spelling and takes
alpha = rank where a module has none, so the folded file means the same there.
"""

from __future__ import annotations

from flowmatch.families.flux2 import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats

_RELEASED = released_formats(convert.diffusers_rules, convert.original_rules)
FORMATS: dict[str, LoraFormat] = {
    **_RELEASED,
    "comfyui": LoraFormat("comfyui", convert.original_rules, prefix="diffusion_model", style="peft",
                          alpha_keys=False, fold_alpha=True,
                          tool="ComfyUI's LoraLoader and diffusers' Flux2Pipeline.load_lora_weights"),
}
