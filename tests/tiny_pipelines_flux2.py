"""A tiny random FLUX.2 [klein] diffusers pipeline (Flux2KleinPipeline), built offline and saved with
`save_pretrained`.

Laid out as black-forest-labs/FLUX.2-klein-base-4B is (model_index.json, transformer/, vae/, scheduler/,
text_encoder/, tokenizer/), with the release's classes: Flux2Transformer2DModel, AutoencoderKLFlux2 (32 latent
channels there, 4 here, patchified 2x2 and normalised by batch-norm statistics that are not the identity),
Qwen3ForCausalLM and a real Qwen2Tokenizer (byte-level BPE) from the small vocabulary of
tests/tiny_pipelines_qwen.py, with the chat special tokens, ``<think>`` / ``</think>`` and a chat template that
renders one user turn as Qwen3's does with ``enable_thinking=False``. The Qwen3 has 27 layers (the pipeline stacks
hidden states 9, 18 and 27) of width 16, so the transformer reads 48 channels. Not distilled: guidance is true CFG.

Tests take the session fixture ``tiny_flux2_pipeline`` (tests/conftest.py) or call :func:`save_flux2_pipeline`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.tiny_pipelines_qwen import qwen_tokenizer

LATENT_CHANNELS = 4
TEXT_WIDTH = 16
TEXT_LAYERS = 27
#: Qwen3's chat template, reduced to what Flux2KleinPipeline renders: one user turn, the generation prompt and the
#: empty thinking block of enable_thinking=False.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                 "{% endif %}{% endif %}")
#: FLUX.2's scheduler/scheduler_config.json (dynamic shifting; the pipeline passes its own empirical mu).
FLUX2_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                       num_train_timesteps=1000, shift=3.0, time_shift_type="exponential", use_dynamic_shifting=True)


def flux2_tokenizer(folder: Path):
    """tests/tiny_pipelines_qwen.py's Qwen2Tokenizer with Qwen3's thinking tokens and :data:`CHAT_TEMPLATE`."""
    tokenizer = qwen_tokenizer(folder)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def flux2_text_encoder(tokenizer, *, seed: int):
    """A tiny random Qwen3ForCausalLM: 27 layers of width 16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"))
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def flux2_vae(seed: int):
    """A tiny AutoencoderKLFlux2 (factor 2) whose batch-norm statistics are not the identity."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                             norm_num_groups=4, sample_size=32)
    features = vae.bn.running_mean.shape[0]
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(features))
        vae.bn.running_var.copy_(0.5 + torch.rand(features))
    return vae.eval()


def save_flux2_pipeline(path: str | Path) -> Path:
    """Save a tiny random Flux2KleinPipeline to `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from tests.test_flux2 import flux2_model

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = flux2_tokenizer(Path(vocab))
    transformer = flux2_model(4, guidance=False, joint_attention_dim=3 * TEXT_WIDTH)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=flux2_vae(5),
                              text_encoder=flux2_text_encoder(tokenizer, seed=1), tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(path)
    return path
