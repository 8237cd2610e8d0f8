"""The Z-Image family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.mmdit import TINY
from flowmatch.families.zimage.convert import FIXED

PRESETS: dict[str, dict[str, Any]] = {
    # Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image (transformer/config.json, ZImageTransformer2DModel): 30
    # single-stream blocks after 2 noise- and 2 context-refiner blocks, 30 heads x 128 (dim 3840, SwiGLU 10240)
    # over 16 latent channels in 2x2 patches; the Qwen3-4B text encoder's 2560-wide states; RoPE theta 256 over
    # (32, 48, 48) channels; norm_eps 1e-5. About 6.15B parameters.
    "zimage": dict(in_channels=16, context_dim=2560, depth=30, refiner_layers=2, num_heads=30, head_dim=128,
                   norm_eps=1e-5, rope_theta=256.0, rope_axes_dim=[32, 48, 48], **FIXED),
}
# The test size: the same modules, one refiner block each, the (32, 48, 48) RoPE split of 128 channels as (4, 6, 6)
# of 16.
PRESETS["tiny-zimage"] = {**PRESETS["zimage"], **TINY, "pooled_dim": 0, "refiner_layers": 1,
                          "rope_axes_dim": [4, 6, 6]}
