"""A tiny random Qwen-Image diffusers pipeline, built offline and saved with `save_pretrained`.

Laid out as Qwen/Qwen-Image is (model_index.json, transformer/, vae/, scheduler/, text_encoder/, tokenizer/), with
the releases' classes: QwenImageTransformer2DModel, AutoencoderKLQwenImage (a causal 3D VAE, used with one
frame, with per-channel latents_mean / latents_std), Qwen2_5_VLForConditionalGeneration as the text encoder and a
real Qwen2Tokenizer (byte-level BPE) made from a small vocabulary: the 256 byte symbols, merges trained on the
pipeline's chat template and :data:`WORDS` that spell each of their words whole, and the chat special tokens.
The template's system prefix is then 34 tokens, as with the released tokenizer, which QwenImagePipeline drops
(``prompt_template_encode_start_idx``). Only the widths and depths are tiny: text width 16, 4 latent channels
packed 2x2 into 16, VAE factor 4 (two spatial downsamplings). Every transformer weight is perturbed, so images
depend on all of them.

Tests take the session fixture ``tiny_qwen_pipeline`` (tests/conftest.py) or call :func:`save_qwen_pipeline`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from flowmatch.families.qwen_image import PROMPT_TEMPLATE

#: Words the small vocabulary spells out whole (the rest falls back to bytes).
WORDS = ("a", "photo", "of", "cat", "dog", "red", "apple", "on", "wooden", "table", "blurry", "bad", "quality")
#: QwenImagePipeline's prompt template (the family's copy, checked against the pipeline's in test_qwen_pipeline).
TEMPLATE = PROMPT_TEMPLATE
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>")
LATENT_CHANNELS = 4
TEXT_WIDTH = 16
#: Qwen/Qwen-Image scheduler/scheduler_config.json.
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


def qwen_tokenizer(folder: Path):
    """A Qwen2Tokenizer from a vocab.json and merges.txt written to `folder`: a byte-level BPE trained by
    `tokenizers` on the template and :data:`WORDS` until every word is one token (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    plain = re.sub(r"<\|[a-z_]+\|>|\{\}", " ", TEMPLATE)
    corpus = [plain, " ".join(WORDS), "system", "user", "assistant"] * 4  # the roles follow a special token
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json and merges.txt
    tokenizer = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in SPECIAL if s != "<|endoftext|>"]})
    return tokenizer


def qwen_text_encoder(tokenizer, *, seed: int):
    """A tiny random Qwen2_5_VLForConditionalGeneration (2 text layers of width 16, a 2-block vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1000000.0,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                         bos_token_id=ids("<|endoftext|>"),
                         rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default")),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH),
        hidden_size=TEXT_WIDTH, vocab_size=len(tokenizer), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vae(seed: int):
    """A tiny AutoencoderKLQwenImage with per-channel latent statistics that are not the identity."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=LATENT_CHANNELS * 6, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()


def qwen_transformer(seed: int):
    """A tiny random QwenImageTransformer2DModel, every weight perturbed (tests/test_qwen_image.py's)."""
    from tests.test_qwen_image import diffusers_qwen

    return diffusers_qwen(seed, joint_attention_dim=TEXT_WIDTH)


def save_qwen_pipeline(path: str | Path) -> Path:
    """Save a tiny random QwenImagePipeline to `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = qwen_tokenizer(Path(vocab))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=qwen_vae(5),
                             text_encoder=qwen_text_encoder(tokenizer, seed=1), tokenizer=tokenizer,
                             transformer=qwen_transformer(4))
    pipe.save_pretrained(path)
    return path


def save_qwen_edit_pipeline(path: str | Path) -> Path:
    """Save a tiny random QwenImageEditPipeline to `path`: the Qwen-Image components and a Qwen2VLProcessor (the
    default image and video processors, this tokenizer) through which its Qwen2.5-VL sees the reference image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = qwen_tokenizer(Path(vocab))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=qwen_vae(5),
                                 text_encoder=qwen_text_encoder(tokenizer, seed=1), tokenizer=tokenizer,
                                 processor=processor, transformer=qwen_transformer(4))
    pipe.save_pretrained(path)
    return path
