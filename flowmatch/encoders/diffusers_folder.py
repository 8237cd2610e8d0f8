"""A diffusers pipeline folder (model_index.json) read into flowmatch's encoder sub-configs.

:func:`encoder_configs_from_pipeline` turns a `StableDiffusion3Pipeline` or `FluxPipeline` folder (or a hub id in
the local cache) into the recipe sections that rebuild its conditioning exactly: every text encoder with its
tokenizer, combined as that pipeline combines them; the VAE with its scaling and shift factors; the scheduler's
shift as a flow section. Nothing is loaded but JSON files; the encoders load their own weights later from the
same folder (``name_or_path`` + ``subfolder``).

Which pipelines are read, and what each does, is its family's (``Family.diffusers``, ``Family.text`` in
``flowmatch/families/<family>/__init__.py``); as their ``encode_prompt`` and ``__call__`` do it (diffusers
0.3x-0.4x):

- ``StableDiffusion3Pipeline`` (SD3, SD3.5): ``text_encoder`` and ``text_encoder_2`` are
  CLIPTextModelWithProjection, run on 77 tokens (the tokenizer's model_max_length) padded with the tokenizer's
  pad token, no attention mask, penultimate hidden states and projected pooled output; ``text_encoder_3`` is T5
  on 256 tokens (``max_sequence_length``), no mask; combined as :mod:`flowmatch.encoders.combine` ``sd3``. Its
  default call: 28 steps, guidance scale 7.0.
- ``FluxPipeline`` (FLUX.1 dev, schnell): ``text_encoder`` is CLIPTextModel (its pooler output), 77 tokens;
  ``text_encoder_2`` is T5 on 512 tokens; combined as ``flux``. Its default call: 28 steps, guidance 3.5 (the
  value FLUX-dev embeds).
- ``ChromaPipeline``: ``text_encoder`` is T5 alone on 512 tokens, given its attention mask, the transformer seeing
  the first padding token too (``padding: max_length_plus_one``); no pooled vector. Its default call: 35 steps,
  classifier-free guidance 5.0 against the empty negative prompt.
- ``QwenImagePipeline`` (Qwen-Image): ``text_encoder`` is Qwen2.5-VL, a decoder LLM behind the pipeline's chat
  template (:mod:`flowmatch.encoders.decoder_llm`, the family's ``decoder_llm`` settings), the only encoder; its
  VAE is AutoencoderKLQwenImage with per-channel statistics. Its default call: 50 steps, true CFG 4.0 with a
  negative prompt, the guided velocity rescaled per token to the conditional one's norm.
- ``ZImagePipeline`` (Z-Image): ``text_encoder`` is Qwen3, a decoder LLM behind the pipeline's chat turn, its
  second-to-last hidden layer; the VAE is FLUX.1's. Its default call: 50 steps, guidance 5.0 as
  ``cond + 5 (cond - uncond)`` (flowmatch's classifier-free scale 6.0).
- ``Flux2KleinPipeline`` and ``Flux2Pipeline`` (FLUX.2 klein and dev, one family): ``text_encoder`` is Qwen3
  (klein) or Mistral-3 (dev, its ``tokenizer`` a PixtralProcessor), a decoder LLM behind the pipeline's chat
  template, three hidden layers side by side on all 512 positions; the VAE is AutoencoderKLFlux2 with batch-norm
  statistics. Klein guides by true CFG 4.0; dev embeds its guidance 4.0. Both: 50 steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowmatch.encoders.autoencoder import AutoencoderConfig
from flowmatch.encoders.text import TextEncoderConfig
from flowmatch.encoders.text_set import TextEncodersConfig
from flowmatch.errors import choice_error
from flowmatch.families import PIPELINES
from flowmatch.families.spec import DiffusersPipeline
from flowmatch.flow.timesteps import FlowConfig

__all__ = ["PIPELINES", "PipelineEncoderConfigs", "encoder_configs_from_pipeline", "read_pipeline_json"]

MODEL_INDEX = "model_index.json"
#: CLIP's context length, when a tokenizer config does not state it.
CLIP_TOKENS = 77
#: FLUX-dev's guidance value in training, as the diffusers and kohya FLUX LoRA docs train it.
FLUX_TRAIN_GUIDANCE = 1.0


@dataclass
class PipelineEncoderConfigs:
    """The sub-configs that rebuild a diffusers pipeline's conditioning, VAE and sampling grid."""

    path: str
    """The folder or hub id they were read from."""
    pipeline_class: str
    """Its model_index.json _class_name: StableDiffusion3Pipeline, FluxPipeline, Flux2Pipeline, ..."""
    family: str
    """The model family whose pipeline it is (flowmatch.families): its text combination and schedule."""
    kind: DiffusersPipeline
    """What the pipeline does: its encoders and default call."""
    text_encoders: TextEncodersConfig
    """Every text encoder and tokenizer (the recipe's text_encoders section)."""
    autoencoder: AutoencoderConfig
    """The VAE with its scaling and shift factors (the recipe's autoencoder section)."""
    flow: FlowConfig
    """The scheduler's shift: fixed for a static-shift scheduler, FLUX's sequence mode for a dynamic one."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """The scheduler config as saved (scheduler/scheduler_config.json)."""
    guidance_embed: bool = False
    """Whether the transformer embeds a guidance value (FLUX-dev)."""


def read_pipeline_json(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """A JSON file of a pipeline folder, or of a hub id from the local cache (nothing is downloaded when
    HF_HUB_OFFLINE=1); FileNotFoundError naming it when missing."""
    local = Path(path)
    if local.is_dir():
        file = local / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: is {str(path)!r} a diffusers pipeline folder?")
        return json.loads(file.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(str(path), name)).read_text())
    except Exception as err:  # huggingface_hub raises several types for a missing repo, file or cache entry
        raise FileNotFoundError(f"could not read {name} of {str(path)!r} ({err.__class__.__name__}: {err}); point "
                                "at a local pipeline folder or a hub id in the local cache") from err


def _optional_json(path: str | os.PathLike, name: str) -> dict[str, Any]:
    try:
        return read_pipeline_json(path, name)
    except FileNotFoundError:
        return {}


def _flow(scheduler: dict[str, Any]) -> FlowConfig:
    if scheduler.get("use_dynamic_shifting"):
        return FlowConfig(shift=1.0, shift_mode="sequence",
                          base_seq_len=int(scheduler.get("base_image_seq_len", 256)),
                          max_seq_len=int(scheduler.get("max_image_seq_len", 4096)),
                          base_shift=float(scheduler.get("base_shift", 0.5)),
                          max_shift=float(scheduler.get("max_shift", 1.15)))
    return FlowConfig(shift=float(scheduler.get("shift", 1.0)), shift_mode="fixed")


def encoder_configs_from_pipeline(path: str | os.PathLike, *, dtype: str = "auto") -> PipelineEncoderConfigs:
    """Read a diffusers SD3 / SD3.5 / FLUX pipeline folder (or cached hub id) into encoder sub-configs.

    Args:
        path: the folder holding model_index.json, or a hub id.
        dtype: weights dtype of the text encoders and the VAE (auto: bf16 on GPU, fp32 on CPU).

    Raises:
        ValueError: the folder is another pipeline class, or lacks a text encoder the combination needs.
    """
    index = read_pipeline_json(path, MODEL_INDEX)
    name = index.get("_class_name", "")
    if name not in PIPELINES:
        raise choice_error(f"the pipeline class of {str(path)!r} ({MODEL_INDEX} _class_name)", name, PIPELINES)
    family, kind = PIPELINES[name].family, PIPELINES[name].pipeline
    where = str(path)
    encoders: dict[str, TextEncoderConfig] = {}
    for ours, sub, tok_sub in kind.text_encoders:
        entry = index.get(sub) or [None, None]
        if entry[1] is None or (index.get(tok_sub) or [None, None])[1] is None:
            raise ValueError(f"{where} has no {sub} / {tok_sub}: flowmatch needs every text encoder of a "
                             f"{name} to reproduce its conditioning")
        if entry[1].startswith("CLIP"):
            tokens = int(_optional_json(path, f"{tok_sub}/tokenizer_config.json").get("model_max_length",
                                                                                      CLIP_TOKENS))
            encoders[ours] = TextEncoderConfig(
                kind="clip", name_or_path=where, subfolder=sub, tokenizer_subfolder=tok_sub,
                max_length=min(tokens, CLIP_TOKENS), padding="max_length", hidden_layer=kind.clip_hidden_layer,
                pooling="projection" if entry[1] == "CLIPTextModelWithProjection" else "pooler", dtype=dtype)
        elif entry[1].startswith(("T5", "UMT5")):
            encoders[ours] = TextEncoderConfig(
                kind="t5", name_or_path=where, subfolder=sub, tokenizer_subfolder=tok_sub,
                max_length=kind.t5_tokens, padding=kind.t5_padding, dropped=kind.t5_dropped, dtype=dtype,
                # T5 alone (no text layout, Chroma): its transformer reads no pooled vector
                pooling="none" if family.text is None else "mean")
        elif kind.decoder_llm is not None:
            encoders[ours] = TextEncoderConfig(kind="decoder_llm", name_or_path=where, subfolder=sub,
                                               tokenizer_subfolder=tok_sub, model_class=entry[1], dtype=dtype,
                                               **kind.decoder_llm)
        else:
            raise ValueError(f"{where}/{sub} is a {entry[1]}; flowmatch reads CLIP and T5 text encoders"
                             + ", and decoder LLMs for the pipelines that use one")
    transformer = _optional_json(path, "transformer/config.json")
    guidance_embed = bool(transformer.get("guidance_embeds", False))
    vae = read_pipeline_json(path, "vae/config.json")
    scheduler = read_pipeline_json(path, "scheduler/scheduler_config.json")
    # Per-channel statistics (AutoencoderKLQwenImage's config, the batch-norm weights of a family whose latents
    # have patch statistics: FLUX.2's AutoencoderKLFlux2) are read by preset "config" itself.
    per_channel = vae.get("latents_std") is not None or family.latents.patch_statistics
    factors = (None, None) if per_channel else (float(vae.get("scaling_factor", 1.0)),
                                                float(vae.get("shift_factor") or 0.0))
    return PipelineEncoderConfigs(
        path=where, pipeline_class=name, family=family.name, kind=kind,
        text_encoders=TextEncodersConfig(combine=family.text.name if family.text else "single", encoders=encoders,
                                         guidance=FLUX_TRAIN_GUIDANCE if guidance_embed else None),
        autoencoder=AutoencoderConfig(kind="vae", name_or_path=where, subfolder="vae", preset="config",
                                      scaling_factor=factors[0], shift_factor=factors[1], dtype=dtype),
        flow=_flow(scheduler), scheduler={k: v for k, v in scheduler.items() if not k.startswith("_")},
        guidance_embed=guidance_embed)


def describe(configs: PipelineEncoderConfigs) -> str:
    """One line per component, for logs."""
    lines = [f"{configs.pipeline_class} at {configs.path}: combine {configs.text_encoders.combine}"]
    for name, c in configs.text_encoders.encoders.items():
        lines.append(f"  {name}: {c.kind} {c.subfolder} ({c.max_length} tokens, layer {c.hidden_layer}, "
                     f"pooled {c.pooling})")
    a = configs.autoencoder
    lines.append(f"  vae: scale {a.scaling_factor}, shift {a.shift_factor}; flow shift {configs.flow.shift_mode} "
                 f"{configs.flow.shift}")
    return "\n".join(lines)

