"""The SD3 family's named sizes, each as its difference from the `MMDiTConfig` defaults (SD3-medium's layout)."""

from __future__ import annotations

from typing import Any

from flowmatch.families.mmdit import TINY

# The released layouts, each as its diffusers transformer config (huggingface.co/<repo>/transformer/config.json)
# describes it; `flowmatch.families.convert.from_diffusers` of those weights gives exactly these configs.
_SD3 = dict(in_channels=16, context_dim=4096, pooled_dim=2048)  # SD3 VAE latents, T5-XXL tokens, CLIP-L+G pooled
_TINY_GRID = dict(sample_size=8, pos_embed_max_size=16)  # the sin-cos position grid of the SD3 layouts

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: 2 joint blocks of width 64 on a small grid; encoder sizes come from the test or trainer.
    "tiny": dict(depth=2, num_heads=4, head_dim=16, sample_size=8, pos_embed_max_size=16),
    # 8x8 single-channel pixel-space digits (scikit-learn's digits): 4x4 tokens of 2x2 pixels, 4 blocks of 4 x 32.
    "digits": dict(in_channels=1, depth=4, num_heads=4, head_dim=32, sample_size=8, pos_embed_max_size=8),
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 blocks of 24 x 64 without QK-norm; about 2B parameters.
    "sd3-medium": dict(**_SD3, qk_norm=False),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, a second image-only attention in blocks 0-12, RMS QK-norm,
    # a 384 x 384 position grid; about 2.5B parameters.
    "sd3.5-medium": dict(**_SD3, dual_attention_layers=list(range(13)), pos_embed_max_size=384),
    # stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 x 64 with RMS QK-norm; about 8B parameters.
    "sd3.5-large": dict(**_SD3, depth=38, num_heads=38),
}
# Tiny versions of the released layouts: the same modules and options at test size.
PRESETS["tiny-sd3-medium"] = {**PRESETS["sd3-medium"], **TINY, **_TINY_GRID}
PRESETS["tiny-sd3.5-medium"] = {**PRESETS["sd3.5-medium"], **TINY, **_TINY_GRID, "dual_attention_layers": [0]}
PRESETS["tiny-sd3.5-large"] = {**PRESETS["sd3.5-large"], **TINY, **_TINY_GRID}
