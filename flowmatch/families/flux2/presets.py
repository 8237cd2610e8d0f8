"""The FLUX.2 family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.flux2.convert import AXES_DIM, FIXED
from flowmatch.families.mmdit import TINY

#: What every FLUX.2 release shares (Flux2Transformer2DModel's defaults, diffusers 0.42): 32 latent channels
#: packed 2x2 into 128 features, heads of 128 channels rotated (32, 32, 32, 32) over (time, row, column,
#: sequence), no pooled text vector.
_FLUX2 = dict(**FIXED, in_channels=32, pooled_dim=0, head_dim=128, rope_axes_dim=AXES_DIM)

PRESETS: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.2-dev (transformer/config.json): 8 double and 48 single blocks of 48 heads x 128 over
    # Mistral-Small-3.1's layers (10, 20, 30) side by side (3 x 5120 = 15360 channels); guidance-distilled, it
    # embeds the guidance value. About 32B parameters.
    "flux2-dev": dict(**_FLUX2, depth=8, single_blocks=48, num_heads=48, context_dim=15360, guidance_embed=True),
    # black-forest-labs/FLUX.2-klein-4B (and -base-4B): 5 double and 20 single blocks of 24 heads over Qwen3-4B's
    # layers (9, 18, 27) (3 x 2560 = 7680 channels); no guidance input.
    "flux2-klein-4b": dict(**_FLUX2, depth=5, single_blocks=20, num_heads=24, context_dim=7680),
    # black-forest-labs/FLUX.2-klein-9B (and -base-9B): 8 double and 24 single blocks of 32 heads over Qwen3-8B's
    # layers (9, 18, 27) (3 x 4096 = 12288 channels); no guidance input.
    "flux2-klein-9b": dict(**_FLUX2, depth=8, single_blocks=24, num_heads=32, context_dim=12288),
}
# The test size: klein's modules at test size; the RoPE split (32, 32, 32, 32) of 128 head channels becomes
# (4, 4, 4, 4) of 16.
PRESETS["tiny-flux2-klein-4b"] = {**PRESETS["flux2-klein-4b"], **TINY, "pooled_dim": 0, "single_blocks": 2,
                         "rope_axes_dim": [4, 4, 4, 4]}
