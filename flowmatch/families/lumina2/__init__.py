"""The Lumina-Image-2 family (``model.family: lumina2``): Alpha-VLLM's Lumina-Image-2.0, a single-stream
transformer with noise and context refiners, grouped-query attention and three-axis RoPE over [caption, image]
(:mod:`flowmatch.models.lumina2`), conditioned on Gemma-2's second-to-last hidden states through the pipeline's
system prompt (:mod:`flowmatch.encoders.decoder_llm`), on the FLUX.1 16-channel VAE's latents. The released network
runs reversed time (1 - t in, data - noise out); its module turns that around, so the family's time is flowmatch's.
Converters in :mod:`.convert`, LoRA file formats in :mod:`.lora_formats`, presets in :mod:`.presets`, FLOP count
in :mod:`.flops`."""

from __future__ import annotations

from typing import Any

from flowmatch.families import mmdit
from flowmatch.families.lumina2 import convert, lora_formats
from flowmatch.families.lumina2.flops import flops
from flowmatch.families.lumina2.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.models.lora import ATTENTION
from flowmatch.models.lumina2 import Lumina2

#: Lumina2Pipeline's system_prompt (diffusers 0.42), which it puts before every prompt (not the negative one).
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")
#: How Lumina2Pipeline runs its Gemma-2 (``_get_gemma_prompt_embeds``): ``system_prompt + " <Prompt Start> " +
#: prompt``, the system prompt's tokens kept in the states (nothing dropped), the second-to-last hidden layer, at
#: most 256 tokens in all (max_sequence_length's default; the pipeline pads to it, flowmatch to the longest: the
#: transformer masks padding either way), no pooled vector; the empty negative prompt read without the system
#: prompt.
TEXT_ENCODER = dict(template=SYSTEM_PROMPT + " <Prompt Start> {}", drop_tokens=0, hidden_layer=-2, max_length=256,
                    pooling="none", empty_template="")
#: Where its RoPE puts the tokens (``model.rope_layout``): the field that tells a Lumina-Image-2 section apart.
ROPE_LAYOUT = convert.FIXED["rope_layout"]


def build(cfg: Any, **kwargs: Any) -> Lumina2:
    """``Lumina2(cfg.architecture(), **kwargs)`` of a recipe's model section (an MMDiTConfig is used as it is)."""
    arch = cfg.architecture() if hasattr(cfg, "architecture") else cfg
    return Lumina2(arch, **kwargs)


def claims(cfg) -> bool:
    """An MMDiT-described section whose RoPE is Lumina-Image-2's captions-first layout."""
    return mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == ROPE_LAYOUT


def lora_targets(cfg) -> list[str]:
    """The attention projections of every block (refiners included), as diffusers'
    examples/dreambooth/train_dreambooth_lora_lumina2.py trains them by default (to_q, to_k, to_v, to_out.0)."""
    return list(ATTENTION[:4])


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
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    # Lumina2Pipeline: sigmas linspace(1, 1/N, N) through the scheduler's shift; the transformer gets
    # 1 - (sigma * 1000) / 1000 in float32 (the module's 1 - t of the rounded t); classifier-free guidance against
    # the empty negative prompt, renormalised per latent row (cfg_normalization's default, True), on every step
    # (cfg_trunc_ratio's default, 1.0, truncates none); 30 steps at guidance 4.0 by default. A dynamic-shift
    # scheduler's mu comes from the latent channel count (its image_seq_len is latents.shape[1]).
    diffusers=DiffusersPipeline(
        pipeline_class="Lumina2Pipeline", text_encoders=(("gemma", "text_encoder", "tokenizer"),),
        t5_tokens=0, clip_hidden_layer=None, t5_dropped="empty", steps=30, guidance_scale=4.0,
        schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=True, time_rounded=True,
                          guidance_renorm_rows=True, mu_from_channels=True),
        decoder_llm=TEXT_ENCODER),
)
