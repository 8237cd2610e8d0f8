"""A tiny random Z-Image diffusers pipeline, built offline and saved with `save_pretrained`.

Laid out as Tongyi-MAI/Z-Image-Turbo is (model_index.json, transformer/, vae/, scheduler/, text_encoder/,
tokenizer/), with the releases' classes: ZImageTransformer2DModel, AutoencoderKL with FLUX.1's scaling and shift
factors, Qwen3Model as the text encoder and a real Qwen2Tokenizer made from a small vocabulary
(tests/tiny_pipelines_qwen.py's) whose chat template writes a user turn as Qwen3's does with
``enable_thinking=True``. Only the widths and depths are tiny: text width 16 from 2 layers (the pipeline reads the
second-to-last hidden states), 4 latent channels, VAE factor 2. Every transformer weight is perturbed, so images
depend on all of them.

Tests take the session fixture ``tiny_zimage_pipeline`` (tests/conftest.py) or call :func:`save_zimage_pipeline`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.tiny_pipelines import FLUX_VAE_FACTORS, LATENT_CHANNELS, vae
from tests.tiny_pipelines_qwen import qwen_tokenizer

TEXT_WIDTH = 16
#: Qwen3's chat template, reduced to what ZImagePipeline asks of it: user turns, then the assistant's turn opened
#: (add_generation_prompt; enable_thinking=True adds no empty thinking block).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json.
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def zimage_text_encoder(tokenizer, *, seed: int):
    """A tiny random Qwen3Model (2 layers of width 16)."""
    from transformers import Qwen3Config, Qwen3Model

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer), rope_theta=1000000.0,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                         bos_token_id=ids("<|endoftext|>"))
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def save_zimage_pipeline(path: str | Path) -> Path:
    """Save a tiny random ZImagePipeline to `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from tests.test_zimage import zimage_model

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = qwen_tokenizer(Path(vocab))
    tokenizer.chat_template = CHAT_TEMPLATE
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
                          vae=vae(FLUX_VAE_FACTORS, seed=5), text_encoder=zimage_text_encoder(tokenizer, seed=1),
                          tokenizer=tokenizer,
                          transformer=zimage_model(4, in_channels=LATENT_CHANNELS, cap_feat_dim=TEXT_WIDTH))
    pipe.save_pretrained(path)
    return path
