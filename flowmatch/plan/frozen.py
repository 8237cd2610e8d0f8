"""The frozen parts' sizes for the planner: each text encoder's and the autoencoder's parameter count, widths and
downsampling, read from their configs (a meta-device model of the config counts the parameters; nothing is
loaded).

A config is read where the recipe points (a local folder, a ``pkg:`` folder, a hub id in the local cache); a hub id
that is not cached is looked up in :data:`RELEASED`, the released pipelines' own config values, so a plan for SD3
or FLUX needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from flowmatch.encoders.autoencoder import VAE_CLASSES, AutoencoderConfig, vae_sizes
from flowmatch.encoders.loading import resolve_model_path
from flowmatch.encoders.text import MODEL_CLASSES, TextEncoderConfig

# Released configs (the architecture values of the config.json of each named folder on huggingface.co):
# T5-v1.1-XXL's encoder (google/t5-v1_1-xxl), CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14),
# OpenCLIP ViT-bigG/14's text tower (SD3's text_encoder_2), and the 16-channel VAE of SD3 and FLUX.1 (their
# vae/config.json).
_T5_XXL = dict(model_type="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu")
_T5_XL = dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")  # google/flan-t5-xl
_CLIP_L = dict(model_type="clip_text_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, vocab_size=49408, projection_dim=768)
_CLIP_G = dict(model_type="clip_text_model", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, max_position_embeddings=77, vocab_size=49408, projection_dim=1280)
_VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False)
# Qwen-Image's text_encoder is Qwen2.5-VL-7B-Instruct (Qwen/Qwen2.5-VL-7B-Instruct config.json: the 28-layer
# 3584-wide text model and the 32-block vision tower, loaded whole as Qwen2_5_VLForConditionalGeneration); its vae
# is AutoencoderKLQwenImage (Qwen/Qwen-Image vae/config.json: the class's own defaults, written out).
_QWEN25_VL_7B = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                     tie_word_embeddings=False,
                     text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                      max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False),
                     vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                        out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                                        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))
_QWEN_VAE = dict(_class_name="AutoencoderKLQwenImage", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])
# Z-Image's and FLUX.2 [klein] 4B's text_encoder is Qwen3-4B (Qwen/Qwen3-4B config.json: 36 layers 2560 wide, tied
# embeddings); Z-Image's vae is FLUX.1's.
_QWEN3_4B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=2560, intermediate_size=9728,
                 num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Lumina-Image-2's text_encoder is Gemma-2-2B's decoder (Gemma2Model; google/gemma-2-2b config.json: 26 layers of
# width 2304, 8 query and 4 key/value heads of 256, a 9216-wide gated MLP, 256000 tokens); its vae is FLUX.1's.
_GEMMA2_2B = dict(model_type="gemma2", architectures=["Gemma2Model"], hidden_size=2304, intermediate_size=9216,
                  num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000)
# FLUX.2's vae is AutoencoderKLFlux2 (the class's defaults: 32 latent channels, factor 8).
_FLUX2_VAE = dict(_class_name="AutoencoderKLFlux2", in_channels=3, out_channels=3, latent_channels=32,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# FLUX.2 [dev]'s text_encoder is Mistral-Small-3.1-24B (Mistral3ForConditionalGeneration: a 40-layer 5120-wide
# Mistral text model with a 32768-wide MLP, 32 query and 8 key/value heads of 128, 131072 tokens, and the 24-layer
# 1024-wide Pixtral vision tower). Its config.json as published: mistralai/Mistral-Small-3.1-24B-Instruct-2503 (the
# same values in FLUX.2-dev's text_encoder, written out in kohya-ss/musubi-tuner
# src/musubi_tuner/flux_2/flux2_utils.py, and in transformers' Mistral3 tests). It states no tie_word_embeddings;
# the release holds its own lm_head (24.0B parameters, the model's "24B"), so the value is written out here, where
# transformers' Mistral3Config would tie it by default (23.3B).
_MISTRAL3_24B = dict(model_type="mistral3", architectures=["Mistral3ForConditionalGeneration"], image_token_index=10,
                     multimodal_projector_bias=False, projector_hidden_act="gelu", spatial_merge_size=2,
                     vision_feature_layer=-1, tie_word_embeddings=False,
                     text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768,
                                      num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                                      rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                                      tie_word_embeddings=False),
                     vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=24, num_attention_heads=16, head_dim=64, image_size=1540,
                                        patch_size=14, num_channels=3, rope_theta=10000.0))
_SD3 = {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL, "vae": _VAE16}
_FLUX = {"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL, "vae": _VAE16}
#: hub id -> subfolder -> config values, for released pipelines not in the local cache.
RELEASED: dict[str, dict[str, dict[str, Any]]] = {
    "stabilityai/stable-diffusion-3-medium-diffusers": _SD3,
    "stabilityai/stable-diffusion-3.5-medium": _SD3,
    "stabilityai/stable-diffusion-3.5-large": _SD3,
    "black-forest-labs/FLUX.1-dev": _FLUX,
    "black-forest-labs/FLUX.1-schnell": _FLUX,
    # FLUX.1 Kontext [dev] ships FLUX.1-dev's text encoders and VAE (its text_encoder, text_encoder_2, vae folders).
    "black-forest-labs/FLUX.1-Kontext-dev": _FLUX,
    "Qwen/Qwen-Image": {"text_encoder": _QWEN25_VL_7B, "vae": _QWEN_VAE},
    "Qwen/Qwen2.5-VL-7B-Instruct": {"": _QWEN25_VL_7B},
    "Tongyi-MAI/Z-Image-Turbo": {"text_encoder": _QWEN3_4B, "vae": _VAE16},
    "Alpha-VLLM/Lumina-Image-2.0": {"text_encoder": _GEMMA2_2B, "vae": _VAE16},
    "black-forest-labs/FLUX.2-klein-base-4B": {"text_encoder": _QWEN3_4B, "vae": _FLUX2_VAE},
    "black-forest-labs/FLUX.2-dev": {"text_encoder": _MISTRAL3_24B, "vae": _FLUX2_VAE},
    "google/t5-v1_1-xxl": {"": _T5_XXL},
    "google/flan-t5-xl": {"": _T5_XL},
    "openai/clip-vit-large-patch14": {"": _CLIP_L},
}


#: The autoencoder's name among the frozen parts.
AUTOENCODER = "autoencoder"


@dataclass(frozen=True)
class FrozenPart:
    """One frozen network: its parameter elements, and the bytes per element it is loaded in on each device."""

    name: str
    params: int
    dtype: str
    """Its recipe dtype (auto: bf16 on a GPU, fp32 on the CPU)."""
    quant: Optional[str] = None
    """Its recipe's quantize (text encoders: int8 | fp8 | nf4), priced in place of the dtype."""


@dataclass(frozen=True)
class TextShape:
    """A text encoder's output as the model sees it."""

    kind: str
    tokens: int
    hidden: int
    pooled: int


def _released(name_or_path: str, subfolder: str, key: str) -> dict[str, Any]:
    values = RELEASED.get(name_or_path, {}).get(subfolder or "")
    if values is None:
        raise FileNotFoundError(f"{key}: cannot read the config of {name_or_path!r} (subfolder {subfolder!r}): it "
                                "is neither a local folder nor in the local Hugging Face cache, and not a released "
                                f"pipeline the planner knows ({', '.join(RELEASED)}); point {key} at a local copy")
    return dict(values)


def _text_config(cfg: TextEncoderConfig, key: str):
    from transformers import AutoConfig  # reason: transformers' start-up cost

    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), subfolder=cfg.subfolder,
                                          local_files_only=True)
    except OSError:
        values = _released(cfg.name_or_path, cfg.subfolder, key)
        return AutoConfig.for_model(values.pop("model_type"), **values)


def text_encoder(name: str, cfg: TextEncoderConfig, key: str) -> tuple[FrozenPart, TextShape]:
    """The size and output widths of text encoder ``name`` (``key`` is its recipe section, for errors)."""
    import transformers  # reason: as above

    config = _text_config(cfg, key)
    auto = transformers.AutoModel
    model_cls = getattr(transformers, MODEL_CLASSES.get(cfg.kind, "AutoModel"))  # only the class it needs
    if cfg.pooling == "projection":
        model_cls = transformers.CLIPTextModelWithProjection
    if cfg.kind == "decoder_llm":  # the class the encoder loads (DecoderLLMEncoder._load): the whole checkpoint
        model_cls = getattr(transformers, cfg.model_class or (config.architectures or [""])[0], auto)
    with torch.device("meta"):
        model = model_cls.from_config(config) if model_cls is auto else model_cls(config)
    params = sum(p.numel() for p in model.parameters())
    inner = getattr(config, "text_config", config)
    hidden = int(inner.hidden_size if hasattr(inner, "hidden_size") else inner.d_model)
    pooled = int({"projection": getattr(config, "projection_dim", hidden), "none": 0}.get(cfg.pooling, hidden))
    # Encoders that stack several layers' states side by side are as wide as all of them.
    hidden *= len(getattr(cfg, "stack_layers", None) or [None])
    return FrozenPart(name, params, cfg.dtype, cfg.quantize), TextShape(cfg.kind, cfg.max_length, hidden, pooled)


@dataclass(frozen=True)
class AutoencoderShape:
    """The autoencoder's size and what it makes of images."""

    part: Optional[FrozenPart]
    """None for pixel space (``kind: identity``)."""
    downsample: int
    channels: Optional[int]
    """Latent channels (None: the image's)."""


def autoencoder(cfg: AutoencoderConfig) -> AutoencoderShape:
    """The autoencoder's parameter count, downsampling and latent channels (pixel space: none, 1, the image's)."""
    if cfg.kind == "identity":
        return AutoencoderShape(None, 1, None)
    import diffusers  # reason: diffusers' start-up cost

    try:
        values = dict(diffusers.AutoencoderKL.load_config(resolve_model_path(cfg.name_or_path),
                                                          subfolder=cfg.subfolder or None, local_files_only=True))
    except OSError:
        values = _released(cfg.name_or_path, cfg.subfolder, "autoencoder.name_or_path")
    name = values.get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"autoencoder.name_or_path holds a {name}; flowmatch reads {', '.join(VAE_CLASSES)}")
    with torch.device("meta"):
        vae = getattr(diffusers, name).from_config(values)
    params = sum(p.numel() for p in vae.parameters())
    downsample, channels = vae_sizes(name, vae.config)
    return AutoencoderShape(FrozenPart(AUTOENCODER, params, cfg.dtype), downsample, channels)
