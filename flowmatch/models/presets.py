"""Named MMDiT sizes, each written as its difference from the `MMDiTConfig` defaults (SD3-medium's layout)."""

from __future__ import annotations

import dataclasses
from typing import Any

from flowmatch.errors import nearest
from flowmatch.models.mmdit import MMDiTConfig

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: 2 joint blocks of width 64 on a small grid; encoder sizes come from the test or trainer.
    "tiny": dict(depth=2, num_heads=4, head_dim=16, sample_size=8, pos_embed_max_size=16),
    # 8x8 single-channel pixel-space digits (scikit-learn's digits): 4x4 tokens of 2x2 pixels, 4 blocks of 4 x 32.
    "digits": dict(in_channels=1, depth=4, num_heads=4, head_dim=32, sample_size=8, pos_embed_max_size=8),
    # SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers transformer config): 24 blocks of 24 x 64,
    # 16-channel SD3 VAE latents, T5-XXL context (4096) and CLIP-L+G pooled vector (2048); about 2B parameters.
    # The released SD3-medium weights have no QK-norm: set qk_norm=False to load them.
    "sd3-medium": dict(in_channels=16, context_dim=4096, pooled_dim=2048),
    # SD3.5-large (stabilityai/stable-diffusion-3.5-large transformer config): 38 blocks of 38 x 64 with
    # RMS QK-norm; about 8B parameters.
    "sd3.5-large": dict(in_channels=16, context_dim=4096, pooled_dim=2048, depth=38, num_heads=38),
    # FLUX.1-like layout (black-forest-labs/flux src/flux/util.py "flux-dev": 19 double + 38 single blocks,
    # 24 heads x 128, RoPE theta 10000 on 56 + 56 channels per head, T5-XXL context, CLIP-L pooled 768).
    # Not weight-compatible with FLUX (no guidance embedding); about 12B parameters.
    "flux-style": dict(in_channels=16, context_dim=4096, pooled_dim=768, depth=19, single_blocks=38,
                       num_heads=24, head_dim=128, rope=True, rope_axes_dim=[56, 56]),
}

_FIELDS = {f.name for f in dataclasses.fields(MMDiTConfig)}


def _unknown(kind: str, name: str, allowed: list[str]) -> ValueError:
    close = nearest(name, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (allowed: {', '.join(sorted(allowed))})")


def preset_values(name: str) -> dict[str, Any]:
    """Every `MMDiTConfig` field of preset `name`, `preset` included. Raises ValueError for unknown names."""
    if name not in PRESETS:
        raise _unknown("MMDiT preset", name, list(PRESETS))
    values = dataclasses.asdict(MMDiTConfig())
    values.update(PRESETS[name])
    values["preset"] = name
    return values


def config_from_preset(name: str, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of preset `name` with `overrides` (field -> value) applied on top."""
    values = preset_values(name)
    for key in overrides:
        if key not in _FIELDS:
            raise _unknown("MMDiTConfig field", key, sorted(_FIELDS))
    values.update(overrides)
    return MMDiTConfig(**values)
