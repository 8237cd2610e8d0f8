"""The pixel range, declared once.

An 8-bit pixel value k in 0..255 is the model input x = k / PIXEL_LEVEL_SCALE - 1, in [-1, 1] (the range of
SD3/FLUX autoencoders and of pixel-space models alike); generated x is shown as (x + 1) / 2 in [0, 1] and stored
as round(255 * that). The loader, the likelihood's dequantisation (one level is 1 / PIXEL_LEVEL_SCALE wide) and
generation all convert through here, so the round trip k -> x -> [0, 1] -> k is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

PIXEL_LEVEL_SCALE = 127.5
"""255 / 2: x = k / PIXEL_LEVEL_SCALE - 1 maps 0..255 onto [-1, 1]."""
MAX_LEVEL = 255


def pixels_to_model(pixels: Tensor) -> Tensor:
    """uint8 (or integer-valued) pixels k, any shape -> float32 x = k / 127.5 - 1 in [-1, 1]."""
    return pixels.float().div_(PIXEL_LEVEL_SCALE).sub_(1.0)


def model_to_unit(x: Tensor) -> Tensor:
    """Model-range images x -> (x + 1) / 2, [0, 1] for x in [-1, 1] (not clamped: generated values may overshoot)."""
    return (x + 1) / 2


def unit_to_pixels(images: Tensor) -> Tensor:
    """Images in [0, 1] (clamped first) -> uint8 pixels round(255 * v), for saving."""
    return (images.clamp(0, 1) * MAX_LEVEL).round().to(torch.uint8)
