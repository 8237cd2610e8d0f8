"""The Qwen-Image family's named sizes, each as its difference from the `MMDiTConfig` defaults."""

from __future__ import annotations

from typing import Any

from flowmatch.families.mmdit import TINY

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen-Image (transformer/config.json, QwenImageTransformer2DModel): 60 dual-stream blocks of 24 heads x
    # 128 over 16 latent channels packed 2x2 (in_channels 64 there); the Qwen2.5-VL-7B text encoder's 3584-wide
    # last hidden states, RMS-normalised (txt_norm); no pooled vector; MSRoPE over (frame, row, column) on
    # 16 + 56 + 56 channels, theta 10000; the last block keeps its whole text stream; the time scale
    # multiplies the sinusoid's angles (Timesteps(scale=1000)). About 20B parameters.
    "qwen-image": dict(
        in_channels=16, context_dim=3584, pooled_dim=0, depth=60, num_heads=24, head_dim=128, rope=True,
        rope_layout="msrope", rope_theta=10000.0, rope_axes_dim=[16, 56, 56], context_norm=True,
        text_last_block=True, time_scale_last=True,
    ),
}
# The test size: the same modules and options; the RoPE split (16, 56, 56) of 128 head channels becomes (4, 6, 6)
# of 16. No pooled vector at any size.
PRESETS["tiny-qwen-image"] = {**PRESETS["qwen-image"], **TINY, "pooled_dim": 0, "rope_axes_dim": [4, 6, 6]}
