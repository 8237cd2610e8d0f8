"""A tiny random FLUX.1 Kontext [dev] diffusers pipeline (FluxKontextPipeline), built offline and saved with
`save_pretrained`: the tiny FLUX.1-dev components of tests/tiny_pipelines.py (CLIP-L hidden 32 + T5 d_model 64,
4 latent channels packed 2x2, guidance embedding, VAE factor 2) in Kontext's pipeline class, whose
model_index.json is what tells its FluxTransformer2DModel apart from FLUX.1's.

Tests take the session fixture ``tiny_kontext_pipeline`` (tests/conftest.py) as an argument.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_pipelines import flux_components


def save_kontext_pipeline(path: str | Path) -> Path:
    """Save a tiny random FluxKontextPipeline to `path`."""
    from diffusers import FluxKontextPipeline

    path = Path(path)
    FluxKontextPipeline(**flux_components("flux-dev")).save_pretrained(path)
    return path
