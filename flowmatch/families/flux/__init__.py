"""The FLUX family (``model.family: flux``): FLUX.1 dev and schnell, the shared MMDiT of :mod:`flowmatch.models`
with RoPE, single-stream blocks and (dev) a guidance embedding. Converters in :mod:`.convert`, presets in
:mod:`.presets`."""

from __future__ import annotations

from flowmatch.encoders.combine import TextLayout
from flowmatch.families import mmdit
from flowmatch.families.flux import convert, lora_formats
from flowmatch.families.flux.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.models.lora import ATTENTION

#: Where FLUX's RoPE puts the tokens (``model.rope_layout``).
ROPE_LAYOUT = "flux"
#: FLUX's feed-forward layers and single-block projections, which diffusers' FLUX LoRA script adapts too.
FLUX_EXTRA = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


def claims(cfg) -> bool:
    """An MMDiT with RoPE in FLUX's layout (how recipes before families said FLUX) that takes no reference images
    (those are FLUX.1 Kontext's: :mod:`flowmatch.families.kontext`) and whose blocks modulate themselves (not
    Chroma's)."""
    return (mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == ROPE_LAYOUT
            and not getattr(cfg, "references", 0) and getattr(cfg, "modulation", "adaln") == "adaln")


def lora_targets(cfg) -> list[str]:
    """The joint attention's projections, the feed-forward layers and the single blocks' projections
    (``proj_mlp``, ``proj_out``; as in peft, the suffix ``proj_out`` also names the final projection), as
    diffusers' examples/dreambooth/train_dreambooth_lora_flux.py trains them."""
    return ATTENTION + FLUX_EXTRA


FAMILY = Family(
    name="flux",
    kind=mmdit.KIND,
    summary="MMDiT with RoPE and single-stream blocks: FLUX.1 dev (guidance-distilled) and schnell",
    presets=PRESETS,
    tiny="tiny-flux-dev",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.rope: true",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=16, pack=convert.PACK),
    converter=convert,
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    # FluxPipeline.encode_prompt: context = T5's states, pooled = the one CLIP's pooler output.
    text=TextLayout("flux", clip_states=False, one_clip=True),
    diffusers=DiffusersPipeline(
        pipeline_class="FluxPipeline",
        text_encoders=(("clip_l", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2")),
        t5_tokens=512, clip_hidden_layer=None, t5_dropped="empty", steps=28, guidance_scale=3.5,
        schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=False, time_rounded=True)),
)
