"""The SD3 family (``model.family: sd3``): SD3-medium, SD3.5-medium (MMDiT-X) and SD3.5-large, and flowmatch's own
MMDiTs with a sin-cos position grid (the digits and tiny presets): the shared MMDiT of :mod:`flowmatch.models` with
a context-pre-only last joint block. Converters in :mod:`.convert`, presets in :mod:`.presets`."""

from __future__ import annotations

from flowmatch.encoders.combine import TextLayout
from flowmatch.families import mmdit
from flowmatch.families.sd3 import convert, lora_formats
from flowmatch.families.sd3.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.models.lora import ATTENTION, ATTENTION2


def claims(cfg) -> bool:
    """An MMDiT without RoPE: a sin-cos position grid (every recipe before families that says neither)."""
    return mmdit.is_mmdit(cfg) and not cfg.rope


def lora_targets(cfg) -> list[str]:
    """The joint attention's projections and MMDiT-X's second attention, as diffusers' DreamBooth LoRA script for
    SD3 (examples/dreambooth/train_dreambooth_lora_sd3.py) trains them."""
    return ATTENTION + (ATTENTION2 if cfg.dual_attention_layers else [])


FAMILY = Family(
    name="sd3",
    kind=mmdit.KIND,
    summary="MMDiT with a sin-cos position grid: SD3, SD3.5 (medium: MMDiT-X) and flowmatch's own sizes",
    presets=PRESETS,
    tiny="tiny-sd3.5-medium",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.rope: false",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=16, pack=1),
    converter=convert,
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    # StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G states side by side, padded to T5's width, then T5's
    # tokens; pooled = both CLIP projections.
    text=TextLayout("sd3", clip_states=True, one_clip=False),
    diffusers=DiffusersPipeline(
        pipeline_class="StableDiffusion3Pipeline",
        text_encoders=(("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"),
                       ("t5", "text_encoder_3", "tokenizer_3")),
        # The SD3 pipeline without its T5 feeds zeros of T5's shape: the null a dropped T5 gets.
        t5_tokens=256, clip_hidden_layer=-2, t5_dropped="zeros", steps=28, guidance_scale=7.0,
        schedule=Schedule(max_shift=1.16, default_sigmas=False, classifier_free=True, time_rounded=False)),
)
