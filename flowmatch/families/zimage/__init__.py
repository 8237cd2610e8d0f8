"""The Z-Image family (``model.family: zimage``): Tongyi-MAI's Z-Image, single-stream blocks over [image, text]
after a noise refiner (image tokens) and a context refiner (text tokens), with per-sample sequences padded by
learned tokens (:mod:`flowmatch.models.zimage`), conditioned on a decoder LLM's states (Qwen3-4B's second-to-last
layer through ZImagePipeline's chat template, :mod:`flowmatch.encoders.decoder_llm`); no pooled vector. The
released network runs time backwards (it embeds 1 - t and predicts x0 - noise): the model turns that around
itself, so the rest of flowmatch keeps t = 0 data, t = 1 noise, v = noise - x0. Converters in :mod:`.convert`,
presets in :mod:`.presets`.
"""

from __future__ import annotations

from typing import Any

import torch

from flowmatch.families import mmdit
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, LatentLayout, Schedule
from flowmatch.families.zimage import convert, lora_formats
from flowmatch.families.zimage.presets import PRESETS
from flowmatch.models.flops import TRAIN_FLOPS_PER_ATTENTION_ENTRY, per_weight
from flowmatch.models.zimage import ZImage, padded_length

#: ZImagePipeline's chat turn (its tokenizer's chat template with add_generation_prompt and enable_thinking, which
#: for Qwen3 adds no thinking block).
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: How ZImagePipeline runs its text encoder: the template, nothing dropped, the second-to-last hidden layer, at most
#: 512 tokens with the template (max_sequence_length), no pooled vector.
TEXT_ENCODER = dict(template=PROMPT_TEMPLATE, drop_tokens=0, hidden_layer=-2, max_length=512, pooling="none")


def build(cfg: Any, **kwargs: Any) -> ZImage:
    """``ZImage(cfg.architecture(), **kwargs)`` of a recipe's model section (an MMDiTConfig is used as it is)."""
    return ZImage(cfg.architecture() if hasattr(cfg, "architecture") else cfg, **kwargs)


def claims(cfg) -> bool:
    """A model section whose RoPE layout is Z-Image's."""
    return mmdit.is_mmdit(cfg) and getattr(cfg, "rope_layout", None) == convert.ROPE_LAYOUT


def lora_targets(cfg) -> list[str]:
    """The attention projections of every block (diffusers' names), as LoRA trainers of Z-Image adapt them."""
    return ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]


def flops(cfg: Any, *, batch_size: int, latent_size: tuple[int, int], text_len: int, adapt=None) -> float:
    """Training FLOPs of one step (6 per trained weight and token it is applied to, 4 per frozen one, 12 per
    attention entry and channel; :mod:`flowmatch.models.flops`), at ``text_len`` text tokens per sample: the image
    and text are each padded to a multiple of 32 tokens, which the refiners and blocks run over. ``adapt`` (LoRA:
    :func:`flowmatch.families.lora.training_flops`) changes the meta model in place first."""
    with torch.device("meta"):
        model = build(cfg)
        if adapt is not None:
            adapt(model)
    height, width = latent_size
    n = (height // cfg.patch_size) * (width // cfg.patch_size)
    n_pad, l_pad = padded_length(n), padded_length(text_len)

    def size(*modules) -> int:  # matmul weights only (norm scales and pad tokens multiply elementwise), each
        # weighted by its training FLOPs per token
        return sum(per_weight(p) * p.numel() for m in modules for p in m.parameters() if p.ndim == 2)

    def blocks(blocks) -> int:
        return sum(size(b.attn.qkv, b.attn.proj, b.mlp) for b in blocks)

    per_sample = size(model.time_embed, model.final.modulation,
                      *(b.modulation for b in model.blocks() if b.modulation is not None))
    tokens = (size(model.patch_embed, model.final.linear) * n + size(model.context_embed) * text_len
              + blocks(model.noise_refiner) * n_pad + blocks(model.context_refiner) * l_pad
              + blocks(model.layers) * (n_pad + l_pad))
    entries = (len(model.noise_refiner) * n_pad ** 2 + len(model.context_refiner) * l_pad ** 2
               + len(model.layers) * (n_pad + l_pad) ** 2)
    return float(batch_size * (tokens + per_sample + TRAIN_FLOPS_PER_ATTENTION_ENTRY * entries * cfg.width))


FAMILY = Family(
    name="zimage",
    kind=mmdit.KIND,
    summary="Z-Image: single-stream blocks after noise and context refiners, Qwen3 text, reversed time",
    presets=PRESETS,
    tiny="tiny-zimage",
    build=build,
    claims=claims,
    mismatch=f"model.kind: mmdit with model.rope_layout: {convert.ROPE_LAYOUT}",
    capabilities=Capabilities(init_from=True, lora=True, interval_embed=False, block_transforms=True),
    time_scale=mmdit.TIME_SCALE,  # of 1 - t: the network's own time (flowmatch.models.zimage)
    flops=flops,
    latents=LatentLayout(channels=16, pack=1),
    converter=convert,
    lora_targets=lora_targets,
    lora_formats=lora_formats.FORMATS,
    diffusers=DiffusersPipeline(
        pipeline_class="ZImagePipeline", text_encoders=(("qwen", "text_encoder", "tokenizer"),),
        # ZImagePipeline's guidance_scale g (5.0 by default) guides as cond + g (cond - uncond), which is
        # classifier-free guidance at scale g + 1: flowmatch's scale 6.0 (and g = 0, no guidance, is 1.0).
        t5_tokens=0, clip_hidden_layer=None, t5_dropped="empty", steps=50, guidance_scale=6.0, guidance_offset=-1.0,
        schedule=Schedule(max_shift=1.15, default_sigmas=True, classifier_free=True, time_rounded=False),
        decoder_llm=TEXT_ENCODER),
)
