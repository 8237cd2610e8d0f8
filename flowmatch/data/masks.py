"""Per-sample loss masks: where a sample's loss counts.

A sample's ``mask.png`` member (``flowmatch-data folder`` stores ``NAME.mask.png`` as it; white = counts, black =
does not, grey in between), else, where the recipe asks (``data.alpha_masks``), its image's alpha channel, else
none (the loss counts everywhere). An explicit mask file is intent; transparency often is not (a product photo cut
out on a transparent background), so alpha is opt-in. The mask is
brought to the upright image's size when it has another (a mask of the wrong size is resized, not refused), then
cropped exactly as the image is (:func:`flowmatch.data.decode.resize_cover`); the flow layer takes it to the
latent grid (:func:`flowmatch.flow.loss.latent_mask`).

Cached features (``flowmatch-data encode``) carry each sample's mask as decoded, cropped to its image, as the
cached sample's own ``mask.png`` (:func:`mask_png`), read back by :func:`cached_mask`.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from flowmatch.data.decode import BadSample, has_alpha, open_image, resize_cover
from flowmatch.data.tarstream import RawSample

#: The sample member holding its mask.
MASK_MEMBER = "mask.png"


def decode_mask(sample: RawSample, image_ext: str, *, height: int, width: int, max_pixels: int,
                alpha: bool = False) -> Optional[np.ndarray]:
    """The sample's mask as (height, width) uint8 (255 = the loss counts), cropped as its image is; None when it
    has no mask member and (``alpha``: its image's alpha channel is taken as its mask) no alpha channel."""
    image = open_image(sample.files[image_ext], max_pixels)
    try:
        if MASK_MEMBER in sample.files:
            upright = ImageOps.exif_transpose(image).size
            mask = open_image(sample.files[MASK_MEMBER], max_pixels).convert("L")
            if mask.size != upright:
                mask = mask.resize(upright, Image.Resampling.BILINEAR)
        elif alpha and has_alpha(image):
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


def mask_png(mask: np.ndarray) -> bytes:
    """A decoded mask (H, W) uint8 as the PNG a cached sample stores."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def cached_mask(sample: RawSample, max_pixels: int) -> Optional[np.ndarray]:
    """A cached sample's mask (H, W) uint8 as :func:`mask_png` stored it (already its image's crop), or None."""
    if MASK_MEMBER not in sample.files:
        return None
    try:
        return np.asarray(open_image(sample.files[MASK_MEMBER], max_pixels).convert("L"), dtype=np.uint8)
    except BadSample:
        raise
    except Exception as err:  # truncated or corrupt mask data shows up only here
        raise BadSample("undecodable mask", f"{type(err).__name__}: {err}") from None


def describe_masks(masks: bool, alpha_masks: bool) -> str:
    """The one line a run logs about which loss masks it uses."""
    if not masks:
        return "loss masks: none (data.masks: false): the loss counts everywhere"
    alpha = ("else its image's alpha channel (data.alpha_masks: true)" if alpha_masks else
             "alpha channels are not masks (data.alpha_masks: false)")
    return f"loss masks: each sample's mask.png (NAME.mask.png), {alpha}; without one the loss counts everywhere"
