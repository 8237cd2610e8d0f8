"""Lumina-Image-2's LoRA file formats (:mod:`flowmatch.models.convert.lora_formats`), on Alpha-VLLM's release
module names (:data:`flowmatch.families.lumina2.convert.ORIGINAL`) where the tools use them:

    diffusers  transformer.layers.0.attn.to_q.lora_A.weight (the peft header): split q/k/v, as
               Lumina2Transformer2DModel names its modules
    comfyui    diffusion_model.layers.0.attention.qkv.lora_A.weight / .lora_B.weight: the release's fused
               ``attention.qkv`` (q, k, v rows, as ours), ``attention.out``, ``feed_forward.w1..w3``,
               ``adaLN_modulation.1``, with alpha / rank folded into B and no alpha key
    kohya      lora_unet_layers_0_attention_qkv.lora_down.weight / .lora_up.weight / .alpha (a 0-d tensor)

ComfyUI reads both factor spellings (peft's lora_A / lora_B and kohya's lora_down / lora_up) under
``diffusion_model.``. The comfyui file is the one diffusers reads too: Lumina2LoraLoaderMixin converts a file whose
keys start with ``diffusion_model.`` (``_convert_non_diffusers_lumina2_lora_to_diffusers``, diffusers 0.42.1) by
popping, for every block of each list it finds, ``attention.qkv``, ``attention.out``, ``feed_forward.w1..w3`` and
(refiners of the image and main blocks) ``adaLN_modulation.1`` under peft's factor names, and refuses any key left
over (an ``.alpha`` included; it takes alpha = rank). So the file folds the scale into B, and the blocks'
projections the adapters leave out (the default targets are attention only) are written with zero factors.
diffusers splits the fused q/k/v rows at the release's widths (2304 + 768 + 768): smaller models' comfyui files
load in ComfyUI and flowmatch, not in diffusers; so do files with adapters outside the blocks (the patch
embedding, the final layer), whose keys diffusers' converter refuses. diffusers converts no kohya Lumina-2 file
(its loader then loads nothing): give diffusers the diffusers or comfyui file.
"""

from __future__ import annotations

from flowmatch.families.lumina2 import convert
from flowmatch.models.convert.lora_formats import LoraFormat, released_formats
from flowmatch.models.mmdit import MMDiTConfig


def block_projections(cfg: MMDiTConfig) -> list[str]:
    """Every block's projections that diffusers' Lumina-2 converter reads, in the release's names: q/k/v fused,
    output, the three SwiGLU linears and, in modulated blocks (all but the context refiners), the modulation."""
    n = convert.ORIGINAL
    counts = dict(context_refiner=cfg.refiner_layers, noise_refiner=cfg.refiner_layers, layers=cfg.depth)
    out = []
    for blocks in convert.BLOCK_LISTS:
        own = ["attention.qkv", n.out, *n.ffn] + ([n.mod] if blocks != "context_refiner" else [])
        out += [f"{blocks}.{i}.{name}" for i in range(counts[blocks]) for name in own]
    return out


FORMATS: dict[str, LoraFormat] = {
    **released_formats(convert.diffusers_rules, convert.original_rules),
    "comfyui": LoraFormat("comfyui", convert.original_rules, prefix="diffusion_model", style="peft",
                          alpha_keys=False, fold_alpha=True, required=block_projections,
                          tool="ComfyUI's LoraLoader and diffusers' Lumina2Pipeline.load_lora_weights"),
}
