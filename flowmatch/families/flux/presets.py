"""The FLUX family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.mmdit import TINY

_FLUX = dict(
    # FLUX packs 2x2 patches of its 16 latent channels into 64 features (FluxPipeline._pack_latents), which is
    # our patch_size=2 over 16 channels; 19 double-stream then 38 single-stream blocks of 24 heads x 128;
    # RoPE theta 10000 over ids (0, row, column) on 16 + 56 + 56 channels; T5-XXL context, CLIP-L pooled 768.
    in_channels=16, context_dim=4096, pooled_dim=768, depth=19, single_blocks=38, num_heads=24, head_dim=128,
    rope=True, rope_theta=10000.0, rope_axes_dim=[16, 56, 56],
)

PRESETS: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-dev: guidance-distilled, it embeds the guidance value; about 12B parameters.
    "flux-dev": dict(**_FLUX, guidance_embed=True),
    # black-forest-labs/FLUX.1-schnell: timestep-distilled, no guidance embedding.
    "flux-schnell": dict(**_FLUX),
}
# Tiny versions: the same modules and options at test size; the RoPE split (16, 56, 56) of 128 head channels
# becomes (4, 6, 6) of 16.
for _name in ("flux-dev", "flux-schnell"):
    PRESETS[f"tiny-{_name}"] = {**PRESETS[_name], **TINY, "single_blocks": 2, "rope_axes_dim": [4, 6, 6]}
