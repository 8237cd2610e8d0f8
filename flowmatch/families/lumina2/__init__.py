"""The Lumina-Image-2 family (``model.family: lumina2``): Alpha-VLLM's Lumina-Image-2.0, a single-stream
transformer with noise and context refiners, grouped-query attention and three-axis RoPE over [caption, image]
(:mod:`flowmatch.models.lumina2`), conditioned on Gemma-2's second-to-last hidden states through the pipeline's
system prompt (:mod:`flowmatch.encoders.decoder_llm`), on the FLUX.1 16-channel VAE's latents. The released network
runs reversed time (1 - t in, data - noise out); its module turns that around, so the family's time is flowmatch's.
Converters in :mod:`.convert`, presets in :mod:`.presets`, FLOP count in :mod:`.flops`."""

from __future__ import annotations

from typing import Any

from flowmatch.families import mmdit
from flowmatch.families.lumina2 import convert
from flowmatch.families.lumina2.flops import flops
from flowmatch.families.lumina2.presets import PRESETS
from flowmatch.families.spec import Capabilities, Family, LatentLayout
from flowmatch.models.lumina2 import Lumina2

#: Where its RoPE puts the tokens (``model.rope_layout``): the field that tells a Lumina-Image-2 section apart.
ROPE_LAYOUT = convert.FIXED["rope_layout"]


def build(cfg: Any, **kwargs: Any) -> Lumina2:
    """``Lumina2(cfg.architecture(), **kwargs)`` of a recipe's model section (an MMDiTConfig is used as it is)."""
    arch = cfg.architecture() if hasattr(cfg, "architecture") else cfg
    return Lumina2(arch, **kwargs)


def claims(cfg) -> bool:
    """An MMDiT-described section whose RoPE is Lumina-Image-2's captions-first layout."""
    return mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == ROPE_LAYOUT


FAMILY = Family(
    name="lumina2",
    kind=mmdit.KIND,
    summary="single-stream transformer with refiners, GQA and a Gemma-2 text encoder: Lumina-Image-2",
    presets=PRESETS,
    tiny="tiny-lumina2",
    build=build,
    claims=claims,
    mismatch=f"model.kind: mmdit with model.rope: true and model.rope_layout: {ROPE_LAYOUT}",
    # no interval input for the few-step objectives (the release embeds the time alone)
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=False, block_transforms=True),
    time_scale=1.0,
    flops=flops,
    latents=LatentLayout(channels=16, pack=1),
    converter=convert,
)
