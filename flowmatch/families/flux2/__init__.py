"""The FLUX.2 family (``model.family: flux2``): black-forest-labs' FLUX.2 dev and klein, FLUX.1's double-then-single
block structure (the shared MMDiT of :mod:`flowmatch.models`) with every block's modulation computed once per
forward and shared (``modulation: shared``), SwiGLU MLPs (``mlp: swiglu``), no biases, four-axis RoPE with the text
rotated by its position (``rope_layout: flux2``), no pooled text vector and (dev) a guidance embedding
(diffusers' Flux2Transformer2DModel). Converters in :mod:`.convert`, presets in :mod:`.presets`.

Two diffusers pipelines run it: Flux2KleinPipeline (klein: Qwen3, true CFG) and Flux2Pipeline (dev: Mistral-3,
embedded guidance); a folder is read as the one its model_index.json names, and a run is exported as the one that
runs its transformer (guidance embedding or not) and whose encoders it has (``Family.export_pipeline``).

Latents: AutoencoderKLFlux2's 32 channels, packed 2x2 into 128 token features by the pipeline; the release
normalises those 128 packed features by its batch-norm statistics (``vae.bn``), per packed feature, not per
latent channel.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from flowmatch.families import mmdit
from flowmatch.families.flux2 import convert, lora_formats
from flowmatch.families.flux2.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.models.lora import ATTENTION

#: Flux2KleinPipeline's chat turn as Qwen3's template renders it (add_generation_prompt, enable_thinking=False).
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: How Flux2KleinPipeline runs Qwen3 (diffusers 0.42): the template, nothing dropped, hidden_states 9, 18 and 27
#: side by side, every caption padded to 512 tokens, all of which (padding included) the transformer sees, no
#: pooled vector.
KLEIN_TEXT_ENCODER = dict(template=KLEIN_TEMPLATE, drop_tokens=0, stack_layers=[9, 18, 27], max_length=512,
                          padding="max_length", pooling="none")
#: Flux2Pipeline's system message (diffusers 0.42 ``pipelines/flux2/system_messages.py`` SYSTEM_MESSAGE, from
#: black-forest-labs/flux2 ``src/flux2/system_messages.py``; tests/test_flux2_dev_pipeline.py checks the copy).
DEV_SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                      "object relationships, object\nattribution and actions without speculation.")
#: Flux2Pipeline's chat as Mistral-Small-3.1's chat template renders it (add_generation_prompt=False): the BOS
#: token, the system turn and one user turn. The template writes the BOS itself, so the tokenizer adds none.
DEV_TEMPLATE = "<s>[SYSTEM_PROMPT]" + DEV_SYSTEM_MESSAGE + "[/SYSTEM_PROMPT][INST]{}[/INST]"
#: How Flux2Pipeline runs Mistral-3 (diffusers 0.42 ``_get_mistral_3_small_prompt_embeds``): the captions without
#: Pixtral's image placeholder (``format_input`` removes it), the template, nothing dropped (the system turn's states
#: are tokens too), hidden_states 10, 20 and 30 side by side, every text padded (and truncated, system turn
#: included) to 512 tokens, all of which the transformer sees; no pooled vector.
DEV_TEXT_ENCODER = dict(template=DEV_TEMPLATE, drop_tokens=0, stack_layers=[10, 20, 30], max_length=512,
                        padding="max_length", pooling="none", caption_remove=["[IMG]"])
#: FLUX.2's empirical mu (Flux2Pipeline's compute_empirical_mu, diffusers 0.42): lines in the image sequence
#: length fitted at 10 and 200 steps, interpolated linearly in the step count; past this many tokens the 200-step
#: line alone.
MU_LONG_SEQ = 4300
MU_AT_10_STEPS = (8.73809524e-05, 1.89833333)  # (slope per token, intercept)
MU_AT_200_STEPS = (0.00016927, 0.45666666)


def empirical_mu(seq_len: int, steps: int) -> float:
    """The dynamic shift's mu FLUX.2's pipelines use for ``seq_len`` packed image tokens and ``steps`` steps."""
    at_200 = MU_AT_200_STEPS[0] * seq_len + MU_AT_200_STEPS[1]
    if seq_len > MU_LONG_SEQ:
        return float(at_200)
    at_10 = MU_AT_10_STEPS[0] * seq_len + MU_AT_10_STEPS[1]
    per_step = (at_200 - at_10) / 190.0
    return float(per_step * steps + (at_200 - 200.0 * per_step))


def pipeline_latents(x: Tensor) -> Tensor:
    """Our latents (B, C, H, W) as FLUX.2's pipelines take ``latents=``: 2x2 patches as (C, p_row, p_col) features,
    (B, 4 C, H / 2, W / 2) (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = x.shape
    p = convert.PACK
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


#: FLUX.2's feed-forward layers and single-block fused projections (diffusers' names), adapted beside the attention
#: as FLUX.1's feed-forward and single-block projections are (:data:`flowmatch.families.flux.FLUX_EXTRA`).
FLUX2_EXTRA = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
               "attn.to_qkv_mlp_proj", "attn.to_out"]


#: Flux2KleinPipeline: Qwen3 alone, sigmas linspace(1, 1/N, N) shifted by an empirical mu of the image length and
#: the step count (not the scheduler's base/max shift), t / 1000 rounded in float32 to the transformer, true CFG
#: 4.0 against the empty prompt for the base models (the distilled ones: none); 50 steps by default; a transformer
#: without a guidance embedding (it passes none).
KLEIN_PIPELINE = DiffusersPipeline(
    pipeline_class="Flux2KleinPipeline", text_encoders=(("qwen3", "text_encoder", "tokenizer"),), t5_tokens=0,
    clip_hidden_layer=None, t5_dropped="empty", steps=50, guidance_scale=4.0,
    schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=True, time_rounded=True, mu=empirical_mu),
    decoder_llm=KLEIN_TEXT_ENCODER, pack_latents=pipeline_latents, guidance_embed=False)
#: Flux2Pipeline (dev), klein's but for: Mistral-3 alone (its tokenizer a PixtralProcessor) and its guidance (4.0
#: by default) embedded by the transformer, passed always, with no unconditional pass.
DEV_PIPELINE = dataclasses.replace(
    KLEIN_PIPELINE, pipeline_class="Flux2Pipeline", text_encoders=(("mistral3", "text_encoder", "tokenizer"),),
    schedule=dataclasses.replace(KLEIN_PIPELINE.schedule, classifier_free=False), decoder_llm=DEV_TEXT_ENCODER,
    guidance_embed=True)


def claims(cfg) -> bool:
    """An MMDiT with FLUX.2's four-axis RoPE layout."""
    return mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == convert.FIXED["rope_layout"]


def lora_targets(cfg) -> list[str]:
    """The joint attention's projections, the feed-forward layers and the single blocks' fused projections."""
    return ATTENTION + FLUX2_EXTRA


FAMILY = Family(
    name="flux2",
    kind=mmdit.KIND,
    summary="FLUX.2 dev and klein: FLUX.1's block layout with shared modulation, SwiGLU, no biases, 4-axis RoPE",
    presets=PRESETS,
    tiny="tiny-flux2-klein-4b",
    build=mmdit.build,
    claims=claims,
    mismatch="model.kind: mmdit with model.rope: true and model.rope_layout: flux2",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=32, pack=convert.PACK, patch_statistics=True),
    converter=convert,
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    diffusers=KLEIN_PIPELINE,
    variants=(DEV_PIPELINE,),
)
