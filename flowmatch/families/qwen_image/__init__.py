"""The Qwen-Image family (``model.family: qwen_image``): Qwen/Qwen-Image, the shared MMDiT of
:mod:`flowmatch.models` with 60 dual-stream blocks, no pooled text vector, an RMS-normalised text input from a
decoder LLM (Qwen2.5-VL, :mod:`flowmatch.encoders.decoder_llm`) and MSRoPE with the text on the diagonal.
Converters in :mod:`.convert`, presets in :mod:`.presets`."""

from __future__ import annotations

from flowmatch.families import mmdit
from flowmatch.families.qwen_image import convert
from flowmatch.families.qwen_image.presets import PRESETS
from flowmatch.families.spec import Capabilities, Family, LatentLayout
from flowmatch.models.lora import ATTENTION

#: Where MSRoPE puts the tokens: the layout that tells a Qwen-Image section from FLUX's.
ROPE_LAYOUT = "msrope"


def claims(cfg) -> bool:
    """An MMDiT whose RoPE is MSRoPE."""
    return mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == ROPE_LAYOUT


def lora_targets(cfg) -> list[str]:
    """The joint attention's projections of both streams, as diffusers'
    examples/dreambooth/train_dreambooth_lora_qwen_image.py trains them (to_q, to_k, to_v, to_out.0 by default,
    which also match the text stream's add_*_proj and to_add_out in diffusers' names)."""
    return list(ATTENTION)


FAMILY = Family(
    name="qwen_image",
    kind=mmdit.KIND,
    summary="dual-stream MMDiT with MSRoPE, no pooled vector and a decoder-LLM text encoder: Qwen-Image",
    presets=PRESETS,
    tiny="tiny-qwen-image",
    build=mmdit.build,
    claims=claims,
    mismatch=f"model.kind: mmdit with model.rope: true and model.rope_layout: {ROPE_LAYOUT}",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=16, pack=convert.PACK),
    converter=convert,
    lora_targets=lora_targets,
)
