"""The FLUX.1 Kontext family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.flux.presets import PRESETS as FLUX_PRESETS

PRESETS: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-Kontext-dev: FLUX.1-dev's transformer (its FluxTransformer2DModel config is
    # FLUX.1-dev's, guidance embedding included) trained to take one reference image (FluxKontextPipeline).
    "flux-kontext-dev": dict(**FLUX_PRESETS["flux-dev"], references=1),
    # The same at test size (tiny-flux-dev's blocks).
    "tiny-flux-kontext-dev": dict(**FLUX_PRESETS["tiny-flux-dev"], references=1),
}
