"""The Chroma family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.chroma.convert import APPROXIMATOR, FIXED
from flowmatch.families.flux.presets import PRESETS as FLUX_PRESETS
from flowmatch.families.mmdit import TINY

_TAKEN = ("guidance_embed",)  # Chroma has no guidance input

PRESETS: dict[str, dict[str, Any]] = {
    # lodestones/Chroma1-HD (ChromaTransformer2DModel): FLUX.1-schnell's 19 double and 38 single blocks of 24 heads
    # x 128 over T5-XXL states, with the per-block modulation replaced by the approximator (64 input channels,
    # 5120 wide, 5 residual layers); about 8.9B parameters.
    "chroma": {**{k: v for k, v in FLUX_PRESETS["flux-schnell"].items() if k not in _TAKEN},
               "modulation": FIXED["modulation"], "pooled_dim": 0, **APPROXIMATOR},  # 0: no pooled text
}
# The same modules at test size: tiny-flux-schnell's blocks and a 32-wide, 2-layer approximator.
PRESETS["tiny-chroma"] = {**PRESETS["chroma"], **TINY, "pooled_dim": 0,
                          "single_blocks": 2, "rope_axes_dim": [4, 6, 6], "approximator_channels": 16,
                          "approximator_hidden": 32, "approximator_layers": 2}
