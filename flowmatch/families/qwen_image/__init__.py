"""The Qwen-Image family (``model.family: qwen_image``): Qwen/Qwen-Image, the shared MMDiT of
:mod:`flowmatch.models` with 60 dual-stream blocks, no pooled text vector, an RMS-normalised text input from a
decoder LLM (Qwen2.5-VL, :mod:`flowmatch.encoders.decoder_llm`) and MSRoPE with the text on the diagonal.
Converters in :mod:`.convert`, presets in :mod:`.presets`."""

from __future__ import annotations

from flowmatch.families import mmdit
from flowmatch.families.qwen_image import convert, lora_formats
from flowmatch.families.qwen_image.presets import PRESETS
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.models.lora import ATTENTION

#: Where MSRoPE puts the tokens: the layout that tells a Qwen-Image section from FLUX's.
ROPE_LAYOUT = "msrope"
#: QwenImagePipeline's prompt_template_encode (diffusers 0.42): the chat turns its Qwen2.5-VL reads.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
#: How QwenImagePipeline runs its text encoder: the template, its 34-token system prefix dropped
#: (prompt_template_encode_start_idx), the last hidden layer, at most 512 caption tokens (max_sequence_length's
#: default), no pooled vector.
TEXT_ENCODER = dict(template=PROMPT_TEMPLATE, drop_tokens=34, hidden_layer=-1, max_length=512, pooling="none")


def claims(cfg) -> bool:
    """An MMDiT whose RoPE is MSRoPE, taking no reference images (those are Qwen-Image-Edit's)."""
    return (mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == ROPE_LAYOUT
            and getattr(cfg, "references", 0) == 0)


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
    mismatch=f"model.kind: mmdit with model.rope: true, model.rope_layout: {ROPE_LAYOUT} and no model.references",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=True, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,
    flops=mmdit.flops,
    latents=LatentLayout(channels=16, pack=convert.PACK),
    converter=convert,
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    diffusers=DiffusersPipeline(
        pipeline_class="QwenImagePipeline",
        text_encoders=(("qwen", "text_encoder", "tokenizer"),),
        t5_tokens=0, clip_hidden_layer=None, t5_dropped="empty", steps=50,
        # true_cfg_scale's default; QwenImagePipeline guides only when given a negative prompt.
        guidance_scale=4.0,
        schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=True, time_rounded=True,
                          guidance_renorm=True),
        decoder_llm=TEXT_ENCODER),
)
