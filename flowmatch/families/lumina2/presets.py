"""The Lumina-Image-2 family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.mmdit import TINY

PRESETS: dict[str, dict[str, Any]] = {
    # Alpha-VLLM/Lumina-Image-2.0 (transformer/config.json, Lumina2Transformer2DModel): 26 joint blocks and 2 noise
    # plus 2 context refiners of width 2304 = 24 query heads x 96 (8 key/value heads), SwiGLU hidden 4 x 2304
    # rounded up to a multiple of 256 (9216), RMSNorm eps 1e-5; 16 latent channels in 2x2 patches; Gemma-2-2B's
    # 2304-wide states, RMS-normalised; RoPE over (caption position, row, column) on 32 + 32 + 32 channels,
    # theta 10000; the time 1 - t embedded unscaled. About 2.6B parameters.
    "lumina2": dict(
        in_channels=16, context_dim=2304, pooled_dim=0, depth=26, refiner_layers=2, num_heads=24, kv_heads=8,
        head_dim=96, mlp_ratio=4.0, ffn_multiple_of=256, norm_eps=1e-5, rope=True, rope_layout="lumina2",
        rope_theta=10000.0, rope_axes_dim=[32, 32, 32], context_norm=True, time_scale=1.0,
    ),
}
# The test size: the same modules with two query heads per key/value head, one refiner of each kind, and the
# RoPE split (32, 32, 32) of 96 head channels as (4, 6, 6) of 16.
PRESETS["tiny-lumina2"] = {**PRESETS["lumina2"], **TINY, "pooled_dim": 0, "kv_heads": 2, "refiner_layers": 1,
                           "ffn_multiple_of": 16, "rope_axes_dim": [4, 6, 6]}
