"""A tiny random Lumina-Image-2 diffusers pipeline, built offline and saved with `save_pretrained`.

Laid out as Alpha-VLLM/Lumina-Image-2.0 is (model_index.json, transformer/, vae/, scheduler/, text_encoder/,
tokenizer/), with the release's classes: Lumina2Transformer2DModel, AutoencoderKL with a scaling and a shift factor
(the FLUX.1 VAE's kind), Gemma2Model as the text encoder and a real GemmaTokenizer (byte-fallback BPE) made from a
small vocabulary: the special and byte tokens, then merges trained on the pipeline's system prompt and
:data:`WORDS`. Only the widths and depths are tiny: text width 16, 4 latent channels, a VAE of factor 8 (the factor
Lumina2Pipeline assumes). Every transformer weight is perturbed, so images depend on all of them.

Tests take the session fixture ``tiny_lumina2_pipeline`` (tests/conftest.py) or call :func:`save_lumina2_pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowmatch.families.lumina2 import SYSTEM_PROMPT

#: Words the small vocabulary merges whole (the rest falls back to bytes).
WORDS = ("a", "photo", "of", "cat", "dog", "red", "apple", "on", "wooden", "table", "blurry", "bad", "quality")
SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
LATENT_CHANNELS = 4
TEXT_WIDTH = 16
#: The tiny VAE's factor: three spatial halvings, as Lumina2Pipeline's hard-coded vae_scale_factor.
VAE_FACTOR = 8
#: The tiny VAE's latent factors (not the identity, so that both are checked).
VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
#: A static-shift scheduler, as FlowMatchEulerDiscreteScheduler(shift=6.0).
SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)


def gemma_tokenizer():
    """A GemmaTokenizer (BOS added, byte fallback) over a BPE trained by `tokenizers` on the system prompt and
    :data:`WORDS`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    special = [*SPECIAL, *(f"<0x{i:02X}>" for i in range(256))]
    corpus = [SYSTEM_PROMPT + " <Prompt Start> ", " ".join(WORDS)] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, min_frequency=1, show_progress=False,
                                                        special_tokens=special))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)


def gemma_encoder(tokenizer, *, seed: int):
    """A tiny random Gemma2Model: 3 layers of width 16 (the pipeline reads the second-to-last's states)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32,
                          num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def lumina2_vae(seed: int):
    """A random AutoencoderKL of factor 8 with 4 latent channels and :data:`VAE_FACTORS`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4, sample_size=32,
                         **VAE_FACTORS).eval()


def save_lumina2_pipeline(path: str | Path) -> Path:
    """Save a tiny random Lumina2Pipeline to `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    from tests.test_lumina2 import lumina2_model

    path = Path(path)
    tokenizer = gemma_tokenizer()
    pipe = Lumina2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=lumina2_vae(5),
                           text_encoder=gemma_encoder(tokenizer, seed=1), tokenizer=tokenizer,
                           transformer=lumina2_model(4, cap_feat_dim=TEXT_WIDTH))
    pipe.save_pretrained(path)
    return path
