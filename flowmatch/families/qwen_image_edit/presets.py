"""The Qwen-Image-Edit family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.qwen_image.presets import PRESETS as QWEN_PRESETS

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen-Image-Edit (and -2509): Qwen-Image's transformer (its QwenImageTransformer2DModel config is
    # Qwen-Image's) trained to take one reference image (QwenImageEditPipeline). About 20B parameters.
    "qwen-image-edit": dict(**QWEN_PRESETS["qwen-image"], references=1),
    # The same at test size (tiny-qwen-image's blocks).
    "tiny-qwen-image-edit": dict(**QWEN_PRESETS["tiny-qwen-image"], references=1),
}
