"""The U-Net family's named sizes: `MMDiTConfig` fields it reads (channels, widths, sample size) and its `unet`
sub-section."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The digits job with diffusers' U-Net: two levels (8x8 and 4x4) of 32 channels, one residual block each,
    # cross-attention to the text at 4x4 only (0.5M parameters to the MMDiT's 2.3M); patch_size is its
    # downsampling factor (sides multiple of 2). On CPU a training step's time goes mostly to the transformer
    # blocks' matmuls at 8x8 (64 tokens an image): without them, and at 32 channels, a step costs about half the
    # MMDiT's where 32/64 channels with attention at both levels cost twice it (recipes/digits-ddpm.yaml).
    "digits-unet": dict(kind="unet", in_channels=1, patch_size=2, sample_size=8,
                        unet=dict(block_out_channels=[32, 32], layers_per_block=1, heads=4,
                                  cross_attention=[False, True], norm_num_groups=16)),
}
