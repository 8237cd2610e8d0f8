"""A tiny random Chroma diffusers pipeline (ChromaPipeline), built offline and saved with `save_pretrained`: the
T5 tokenizer from a small vocabulary and the 2-layer T5 (d_model 64) of tests/tiny_pipelines.py, the FLUX.1 VAE
and scheduler configs, and a tiny random ChromaTransformer2DModel (2 double + 2 single blocks, 4 heads x 16, a
24-wide 2-layer approximator) on 4 latent channels packed 2x2.

Tests take the session fixture ``tiny_chroma_pipeline`` (tests/conftest.py) as an argument.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_pipelines import FLUX_SCHEDULER, FLUX_VAE_FACTORS, LATENT_CHANNELS, t5_encoder, t5_tokenizer, vae

#: The tiny transformer's layout (ChromaTransformer2DModel's arguments).
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6),
                   approximator_num_channels=16, approximator_hidden_dim=24, approximator_layers=2)


def chroma_components() -> dict:
    """ChromaPipeline's arguments, every transformer weight perturbed so that all of them reach the images."""
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer(512)
    torch.manual_seed(4)
    transformer = ChromaTransformer2DModel(**TRANSFORMER)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae(FLUX_VAE_FACTORS, 5),
                text_encoder=t5_encoder(tokenizer, d_model=64, seed=3), tokenizer=tokenizer,
                transformer=transformer.eval())


def save_chroma_pipeline(path: str | Path) -> Path:
    """Save a tiny random ChromaPipeline to `path`."""
    from diffusers import ChromaPipeline

    path = Path(path)
    ChromaPipeline(**chroma_components()).save_pretrained(path)
    return path
