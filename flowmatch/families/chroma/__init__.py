"""The Chroma family (``model.family: chroma``): FLUX.1-schnell's MMDiT (RoPE, double then single blocks) whose
blocks take their adaLN modulation from one approximator MLP of the timestep instead of their own linears
(:mod:`flowmatch.models.approximator`), conditioned on T5 alone: no pooled text vector, no guidance input
(lodestones' Chroma1; diffusers' ChromaTransformer2DModel and ChromaPipeline). Converters in :mod:`.convert`,
presets in :mod:`.presets`.

Its text: T5's states with the pipeline's mask, every real token and the first padding token visible
(``text_encoder.padding: max_length_plus_one``); the one encoder is the conditioning as it is
(``text_encoders.combine: single``) and its pooled vector is never read.
"""

from __future__ import annotations

from flowmatch.families import flux, mmdit
from flowmatch.families.chroma import convert, lora_formats
from flowmatch.families.chroma.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule


def claims(cfg) -> bool:
    """An MMDiT whose modulation comes from the approximator."""
    return mmdit.is_mmdit(cfg) and getattr(cfg, "modulation", "adaln") == convert.FIXED["modulation"]


FAMILY = Family(
    name="chroma",
    kind=mmdit.KIND,
    summary="Chroma: FLUX.1-schnell's layout with one modulation approximator for every block, T5 only",
    presets=PRESETS,
    tiny="tiny-chroma",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.modulation: approximator",
    # the approximator's rows cover the timestep alone: no interval input for the few-step objectives
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=False, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=16, pack=convert.PACK),
    converter=convert,
    lora_targets=flux.lora_targets,  # the same diffusers module names as FLUX's blocks
    lora_formats=lora_formats.FORMATS,
    # ChromaPipeline: T5 alone (no text layout: the one encoder is the conditioning), FLUX's grid and time rounding,
    # true classifier-free guidance against the empty negative prompt; 35 steps at guidance 5.0 by default.
    diffusers=DiffusersPipeline(
        pipeline_class="ChromaPipeline", text_encoders=(("t5", "text_encoder", "tokenizer"),),
        t5_tokens=512, clip_hidden_layer=None, t5_dropped="empty", steps=35, guidance_scale=5.0,
        schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=True, time_rounded=True),
        t5_padding="max_length_plus_one"),
)
