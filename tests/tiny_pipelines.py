"""Tiny random SD3 and FLUX.1-dev diffusers pipelines, built offline and saved with `save_pretrained`.

Each folder is laid out as the released ones are (model_index.json, transformer/, vae/, scheduler/,
text_encoder*/, tokenizer*/), with real tokenizer classes made from a small vocabulary: CLIP's byte-level BPE from
a vocab.json and merges.txt written here, and T5's Unigram from a `tokenizers` Unigram model. The component
classes, the combination of encoders, the CLIP pad tokens (CLIP-L pads with its end token, CLIP-G with "!"),
the sequence lengths (77 CLIP tokens, 256 T5 tokens for SD3 and 512 for FLUX) and the VAE and scheduler factors
are the releases'; only the widths and depths are tiny. Every transformer weight is perturbed (see
tests.interop_models.diffusers_model), so images depend on all of them.

    SD3:  CLIP-L (hidden 32, projection 32) + CLIP-G (hidden 48, projection 48) + T5 (d_model 96):
          context width 96 (CLIP 80 zero-padded to 96), pooled 80, 4 latent channels, VAE factor 2.
    FLUX: CLIP-L (hidden 32, pooled 32) + T5 (d_model 64): context 64, pooled 32, 4 latent channels packed
          2x2 into 16, guidance embedding, VAE factor 2.

Tests take the session fixtures ``tiny_sd3_pipeline`` / ``tiny_flux_pipeline`` (paths to the folders, defined in
tests/conftest.py, built once per session) as arguments, or call :func:`save_sd3_pipeline` /
:func:`save_flux_pipeline` directly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tests.interop_models import diffusers_model

#: Words the small vocabularies spell out whole; any other text falls back to characters (CLIP: bytes).
WORDS = ("a", "photo", "of", "cat", "dog", "red", "apple", "on", "wooden", "table", "city", "street", "at",
         "night", "painting", "the")
LATENT_CHANNELS = 4
#: SD3's and FLUX.1's VAE latent normalisation (their vae/config.json).
SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
#: stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
#: black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
CLIP_MAX_LENGTH = 77


def clip_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer read from a vocab.json and merges.txt written to `folder`: the 256 byte symbols (alone and
    word-final), BPE merges spelling out :data:`WORDS`, and the start and end tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((w o) r) d</w>
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer(max_length: int):
    """A T5Tokenizer over a `tokenizers` Unigram model: pad 0, end 1, unknown 2, then word pieces for
    :data:`WORDS` and single letters and digits (so any lowercase or numeric word tokenizes)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)  # builds tokenizers' Unigram


def clip_encoder(tokenizer, *, hidden: int, projection: int | None, seed: int):
    """A random CLIP text tower: CLIPTextModelWithProjection (SD3) when `projection` is given, else CLIPTextModel
    (FLUX). Its end token is the tokenizer's, so the pooled state is taken at the first end token, as in the
    released configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=projection or hidden, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(tokenizer, *, d_model: int, seed: int):
    """A random 2-layer T5 encoder (gated GELU as T5 v1.1, which SD3 and FLUX use)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                      relative_attention_max_distance=32)
    return T5EncoderModel(config).eval()


def vae(factors: dict, seed: int):
    """A random AutoencoderKL with 4 latent channels, downsampling 2, and the release's latent factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4, sample_size=32,
                         **factors).eval()


def save_sd3_pipeline(path: str | Path, *, kind: str = "sd3-medium") -> Path:
    """Save a tiny random StableDiffusion3Pipeline to `path`; `kind` is the transformer's layout (sd3-medium,
    sd3.5-large or sd3.5-medium, see tests.interop_models.KINDS)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = clip_tokenizer(Path(vocab, "l"))
        tokenizer_2 = clip_tokenizer(Path(vocab, "g"), pad_token="!")
    tokenizer_3 = t5_tokenizer(256)
    text_encoder = clip_encoder(tokenizer, hidden=32, projection=32, seed=1)
    text_encoder_2 = clip_encoder(tokenizer_2, hidden=48, projection=48, seed=2)
    text_encoder_3 = t5_encoder(tokenizer_3, d_model=96, seed=3)
    transformer = diffusers_model(kind, seed=4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                  joint_attention_dim=96, pooled_projection_dim=32 + 48, sample_size=16,
                                  pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae(SD3_VAE_FACTORS, seed=5), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path


def save_flux_pipeline(path: str | Path, *, kind: str = "flux-dev") -> Path:
    """Save a tiny random FluxPipeline to `path`; `kind` is flux-dev (guidance embedding) or flux-schnell."""
    from diffusers import FluxPipeline

    path = Path(path)
    FluxPipeline(**flux_components(kind)).save_pretrained(path)
    return path


def flux_components(kind: str = "flux-dev") -> dict:
    """The components of a tiny random FLUX.1 pipeline (FluxPipeline's and FluxKontextPipeline's arguments)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = clip_tokenizer(Path(vocab))
    tokenizer_2 = t5_tokenizer(512)
    text_encoder = clip_encoder(tokenizer, hidden=32, projection=None, seed=1)
    text_encoder_2 = t5_encoder(tokenizer_2, d_model=64, seed=3)
    transformer = diffusers_model(kind, seed=4, in_channels=4 * LATENT_CHANNELS, joint_attention_dim=64,
                                  pooled_projection_dim=32)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae(FLUX_VAE_FACTORS, 5),
                text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                transformer=transformer)
