"""Per-sample loss masks: where a sample's loss counts.

A sample's ``mask.png`` member (``flowmatch-data folder`` stores ``NAME.mask.png`` as it; white = counts, black =
does not, grey in between), else its image's alpha channel, else none (the loss counts everywhere). The mask is
brought to the upright image's size when it has another (a mask of the wrong size is resized, not refused), then
cropped exactly as the image is (:func:`flowmatch.data.decode.resize_cover`); the flow layer takes it to the
latent grid (:func:`flowmatch.flow.loss.latent_mask`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from flowmatch.data.decode import BadSample, open_image, resize_cover
from flowmatch.data.tarstream import RawSample

#: The sample member holding its mask.
MASK_MEMBER = "mask.png"


def has_alpha(image: Image.Image) -> bool:
    """Whether an opened image carries transparency."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def decode_mask(sample: RawSample, image_ext: str, *, height: int, width: int,
                max_pixels: int) -> Optional[np.ndarray]:
    """The sample's mask as (height, width) uint8 (255 = the loss counts), cropped as its image is; None when it
    has neither a mask member nor an alpha channel."""
    image = open_image(sample.files[image_ext], max_pixels)
    try:
        if MASK_MEMBER in sample.files:
            upright = ImageOps.exif_transpose(image).size
            mask = open_image(sample.files[MASK_MEMBER], max_pixels).convert("L")
            if mask.size != upright:
                mask = mask.resize(upright, Image.Resampling.BILINEAR)
        elif has_alpha(image):
            mask = ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
        else:
            return None
        return np.asarray(resize_cover(mask, height, width), dtype=np.uint8).reshape(height, width)
    except BadSample:
        raise
    except Exception as err:  # truncated or corrupt mask data shows up only here
        raise BadSample("undecodable mask", f"{type(err).__name__}: {err}") from None


def masks_to_tensor(masks: list[Optional[np.ndarray]], height: int, width: int) -> Optional[torch.Tensor]:
    """(B, 1, H, W) float32 in [0, 1], ones for a sample without a mask; None when no sample has one."""
    if all(m is None for m in masks):
        return None
    full = np.full((height, width), 255, dtype=np.uint8)
    stacked = np.stack([full if m is None else m for m in masks])
    return torch.from_numpy(stacked).unsqueeze(1).float().div_(255.0)
