"""The Qwen-Image-Edit family (``model.family: qwen_image_edit``): Qwen-Image's MMDiT taking the clean latents of
one reference image (``Conditioning.reference``) as extra image tokens at MSRoPE frame 1, the velocity predicted
for the target's tokens only; its Qwen2.5-VL text encoder reads the instruction *and sees the reference image*
through its processor (:meth:`flowmatch.encoders.decoder_llm.DecoderLLMEncoder.encode_with_images`), as
diffusers' QwenImageEditPipeline does. Converters in :mod:`.convert` (Qwen-Image's key tables), presets in
:mod:`.presets`.

Any MMDiT with MSRoPE and ``model.references >= 1`` is this family's.
"""

from __future__ import annotations

import dataclasses
import math

from flowmatch.families import kontext, mmdit, qwen_image
from flowmatch.families.qwen_image_edit import convert, lora_formats
from flowmatch.families.qwen_image_edit.presets import PRESETS

#: QwenImageEditPipeline's prompt_template_encode (diffusers 0.42): the chat turns its Qwen2.5-VL reads, the
#: reference image's placeholder (expanded by the processor to the image's patches) before the instruction.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n")
#: How QwenImageEditPipeline runs its text encoder: the template through the processor (subfolder ``processor``)
#: with the resized reference image, its 64-token system prefix dropped (prompt_template_encode_start_idx), the
#: last hidden layer, no truncation below its 1024-token limit (tokenizer_max_length), no pooled vector.
TEXT_ENCODER = dict(template=PROMPT_TEMPLATE, drop_tokens=64, hidden_layer=-1, max_length=1024, pooling="none",
                    processor_subfolder="processor")
#: The pixel area QwenImageEditPipeline resizes a reference image to, at the image's aspect (its
#: ``calculate_dimensions(1024 * 1024, ratio)``); also the generated image's default size there.
REFERENCE_AREA = 1024 * 1024
#: calculate_dimensions rounds each side to this many pixels.
REFERENCE_ROUND = 32


def claims(cfg) -> bool:
    """An MMDiT whose RoPE is MSRoPE that takes reference images (``model.references``)."""
    return (mmdit.is_mmdit(cfg) and bool(cfg.rope) and cfg.rope_layout == qwen_image.ROPE_LAYOUT
            and getattr(cfg, "references", 0) > 0)


def reference_size(height: int, width: int, multiple: int, *, area: int = REFERENCE_AREA) -> tuple[int, int]:
    """The (height, width) in pixels QwenImageEditPipeline resizes a reference image of height x width to: the
    size of ``area`` pixels at its aspect, each side rounded to 32 (``calculate_dimensions``), then floored to
    ``multiple`` (the VAE's factor times the 2x2 packing; 32 is already one at the released factor 8).
    ``functools.partial(reference_size, area=...)`` as a Pipeline's ``reference_size`` sets another area."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w, h = round(w / REFERENCE_ROUND) * REFERENCE_ROUND, round(h / REFERENCE_ROUND) * REFERENCE_ROUND
    return h // multiple * multiple, w // multiple * multiple


FAMILY = dataclasses.replace(
    qwen_image.FAMILY,
    name="qwen_image_edit",
    summary="Qwen-Image-Edit: Qwen-Image with clean reference-image tokens at MSRoPE frame 1 and a "
            "vision-language encoder that sees the reference (image editing)",
    presets=PRESETS,
    tiny="tiny-qwen-image-edit",
    claims=claims,
    mismatch=f"model.kind: mmdit with model.rope: true, model.rope_layout: {qwen_image.ROPE_LAYOUT} and "
             "model.references >= 1",
    capabilities=dataclasses.replace(qwen_image.FAMILY.capabilities, references=convert.REFERENCES),
    # The references' tokens counted as Kontext counts them (references the target's size).
    flops=kontext.flops,
    converter=convert,
    lora_formats=lora_formats.FORMATS,
    # QwenImageEditPipeline walks the grid (its shift from the target's tokens alone) and guides (true CFG with a
    # negative prompt, renormalised) as QwenImagePipeline does, with the same defaults (50 steps, 4.0).
    diffusers=dataclasses.replace(qwen_image.FAMILY.diffusers, pipeline_class="QwenImageEditPipeline",
                                  decoder_llm=TEXT_ENCODER, reference_size=reference_size),
)
