"""Named MMDiT sizes, each written as its difference from the `MMDiTConfig` defaults (SD3-medium's layout)."""

from __future__ import annotations

import dataclasses
from typing import Any

from flowmatch.errors import nearest
from flowmatch.models.mmdit import MMDiTConfig

# The released layouts, each as its diffusers transformer config (huggingface.co/<repo>/transformer/config.json)
# describes it; `flowmatch.models.from_diffusers` of those weights gives exactly these configs.
_SD3 = dict(in_channels=16, context_dim=4096, pooled_dim=2048)  # SD3 VAE latents, T5-XXL tokens, CLIP-L+G pooled
_FLUX = dict(
    # FLUX packs 2x2 patches of its 16 latent channels into 64 features (FluxPipeline._pack_latents), which is
    # our patch_size=2 over 16 channels; 19 double-stream then 38 single-stream blocks of 24 heads x 128;
    # RoPE theta 10000 over ids (0, row, column) on 16 + 56 + 56 channels; T5-XXL context, CLIP-L pooled 768.
    in_channels=16, context_dim=4096, pooled_dim=768, depth=19, single_blocks=38, num_heads=24, head_dim=128,
    rope=True, rope_theta=10000.0, rope_axes_dim=[16, 56, 56],
)
# Test-sized blocks for the released layouts; encoder and latent sizes come from the test or the trainer.
_TINY = dict(depth=2, num_heads=4, head_dim=16, in_channels=None, context_dim=None, pooled_dim=None)
_TINY_GRID = dict(sample_size=8, pos_embed_max_size=16)  # the sin-cos position grid of the SD3 layouts

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: 2 joint blocks of width 64 on a small grid; encoder sizes come from the test or trainer.
    "tiny": dict(depth=2, num_heads=4, head_dim=16, sample_size=8, pos_embed_max_size=16),
    # 8x8 single-channel pixel-space digits (scikit-learn's digits): 4x4 tokens of 2x2 pixels, 4 blocks of 4 x 32.
    "digits": dict(in_channels=1, depth=4, num_heads=4, head_dim=32, sample_size=8, pos_embed_max_size=8),
    # The digits job with diffusers' U-Net instead: two levels (8x8 and 4x4) of 32 channels, one residual block
    # each, cross-attention to the text at 4x4 only (0.5M parameters to the MMDiT's 2.3M); patch_size is its
    # downsampling factor (sides multiple of 2). On CPU a training step's time goes mostly to the transformer
    # blocks' matmuls at 8x8 (64 tokens an image): without them, and at 32 channels, a step costs about half the
    # MMDiT's where 32/64 channels with attention at both levels cost twice it (recipes/digits-ddpm.yaml).
    "digits-unet": dict(kind="unet", in_channels=1, patch_size=2, sample_size=8,
                        unet=dict(block_out_channels=[32, 32], layers_per_block=1, heads=4,
                                  cross_attention=[False, True], norm_num_groups=16)),
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 blocks of 24 x 64 without QK-norm; about 2B parameters.
    "sd3-medium": dict(**_SD3, qk_norm=False),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, a second image-only attention in blocks 0-12, RMS QK-norm,
    # a 384 x 384 position grid; about 2.5B parameters.
    "sd3.5-medium": dict(**_SD3, dual_attention_layers=list(range(13)), pos_embed_max_size=384),
    # stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 x 64 with RMS QK-norm; about 8B parameters.
    "sd3.5-large": dict(**_SD3, depth=38, num_heads=38),
    # black-forest-labs/FLUX.1-dev: guidance-distilled, it embeds the guidance value; about 12B parameters.
    "flux-dev": dict(**_FLUX, guidance_embed=True),
    # black-forest-labs/FLUX.1-schnell: timestep-distilled, no guidance embedding.
    "flux-schnell": dict(**_FLUX),
}
# Tiny versions of the released layouts: the same modules and options at test size. FLUX's RoPE split
# (16, 56, 56) of 128 head channels becomes (4, 6, 6) of 16.
PRESETS["tiny-sd3-medium"] = {**PRESETS["sd3-medium"], **_TINY, **_TINY_GRID}
PRESETS["tiny-sd3.5-medium"] = {**PRESETS["sd3.5-medium"], **_TINY, **_TINY_GRID, "dual_attention_layers": [0]}
PRESETS["tiny-sd3.5-large"] = {**PRESETS["sd3.5-large"], **_TINY, **_TINY_GRID}
for _name in ("flux-dev", "flux-schnell"):
    PRESETS[f"tiny-{_name}"] = {**PRESETS[_name], **_TINY, "single_blocks": 2, "rope_axes_dim": [4, 6, 6]}

_FIELDS = {f.name for f in dataclasses.fields(MMDiTConfig)}


def _unknown(kind: str, name: str, allowed: list[str]) -> ValueError:
    close = nearest(name, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (allowed: {', '.join(sorted(allowed))})")


#: The name of a config built field by field (e.g. converted weights that match no preset): the defaults.
CUSTOM = "custom"


def preset_values(name: str) -> dict[str, Any]:
    """Every `MMDiTConfig` field of preset `name`, `preset` included (a U-Net preset adds the `ModelConfig` fields
    `kind` and `unet`); "custom" gives the `MMDiTConfig` defaults
    (a saved recipe whose weights matched no preset lists every field anyway). ValueError for unknown names."""
    if name not in PRESETS and name != CUSTOM:
        raise _unknown("MMDiT preset", name, [*PRESETS, CUSTOM])
    values = dataclasses.asdict(MMDiTConfig())
    values.update(PRESETS.get(name, {}))
    values["preset"] = name
    return values


def is_mmdit_preset(name: str) -> bool:
    """Whether preset `name` is an MMDiT's (the U-Net presets set the `ModelConfig` field `kind`)."""
    return PRESETS.get(name, {}).get("kind", "mmdit") == "mmdit"


def config_from_preset(name: str, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of preset `name` with `overrides` (field -> value) applied on top."""
    values = preset_values(name)
    if not is_mmdit_preset(name):
        raise ValueError(f"preset {name!r} is a model.kind: {values['kind']} preset, not an MMDiT's; use it as the "
                         "recipe's model.preset")
    for key in overrides:
        if key not in _FIELDS:
            raise _unknown("MMDiTConfig field", key, sorted(_FIELDS))
    values.update(overrides)
    return MMDiTConfig(**values)
