"""Turn raw samples into training tensors: captions, images in [-1, 1] (flowmatch.data.pixels), cached features.

`peek_*` reads only what batching needs (caption, image header or feature header), cheap enough to run again on
the samples a resumed loader reads back into its partial batches; `decode_*` does the full work. A paired
(editing) sample also names its reference images (flowmatch.data.shardformat.reference_members); one without
them, or with a gap in their numbering, is a bad sample ("missing reference") like a corrupt one.
Every problem raises `BadSample` with a short reason that becomes a counter name.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from flowmatch.data import features
from flowmatch.data.pixels import pixels_to_model
from flowmatch.data.shardformat import reference_members
from flowmatch.data.tarstream import RawSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
MODES = {1: "L", 3: "RGB"}
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height swap (EXIF 2.3, tag 0x0112).
EXIF_ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Resize in at most this many reduction steps' worth of box filtering before bicubic (PIL's reducing_gap):
# much faster on large photos, visually identical at training resolutions.
REDUCING_GAP = 3.0


class BadSample(Exception):
    """A sample that cannot be used; str(err) is the reason (a short phrase) and `detail` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SampleInfo:
    """What batching needs to know about a sample before decoding it.

    size: (width, height) of the image after EXIF rotation (raw), or None; feature_key: the feature shapes
    (cached); references: the member extensions of a paired sample's reference images, in order.
    """

    caption: str
    image_ext: str = ""
    size: Optional[tuple[int, int]] = None
    feature_key: tuple = ()
    references: tuple[str, ...] = ()


def read_caption(sample: RawSample, caption_key: str = "") -> str:
    """The .txt caption, else the "caption" (or "text") field of the .json; BadSample when neither exists.

    `caption_key` names another place: the member with that extension, else that field of the .json.
    """
    member, fields = (caption_key, (caption_key,)) if caption_key else ("txt", ("caption", "text"))
    if member in sample.files:
        try:
            return sample.files[member].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise BadSample("caption not utf-8", str(err)) from None
    if "json" in sample.files:
        try:
            meta = json.loads(sample.files["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise BadSample("unreadable json", str(err)) from None
        if isinstance(meta, dict):
            for name in fields:
                if isinstance(meta.get(name), str):
                    return meta[name].strip()
    raise BadSample("missing caption", f"no .{member} and no {fields[0]} in .json")


def image_member(sample: RawSample) -> str:
    """The extension of the sample's image member; BadSample when it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample.files:
            return ext
    raise BadSample("missing image", f"members: {', '.join(sorted(sample.files)) or 'none'}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and bound the pixel count before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("oversized image", str(err)) from None
    except Exception as err:  # PIL raises many types for garbage (UnidentifiedImageError, SyntaxError, ...)
        raise BadSample("undecodable image", f"{type(err).__name__}: {err}") from None
    if image.width * image.height > max_pixels:
        raise BadSample("oversized image", f"{image.width}x{image.height} > data.max_image_pixels={max_pixels}")
    return image


MISSING_REFERENCE = "missing reference"
UNDECODABLE_REFERENCE = "undecodable reference"


def paired_references(sample: RawSample) -> tuple[str, ...]:
    """The member extensions of a paired sample's reference images; BadSample("missing reference") when it has
    none or their numbering has a gap."""
    refs, gap = reference_members(sample.files)
    if not refs or gap:
        found = ", ".join(sorted(sample.files)) or "none"
        raise BadSample(MISSING_REFERENCE, f"a paired sample needs ref.EXT (then ref_1.EXT, ...); members: {found}")
    return tuple(refs)


def peek_raw(sample: RawSample, *, max_pixels: int, need_size: bool, caption_key: str = "",
             paired: bool = False) -> SampleInfo:
    """Caption and image member (and, for buckets, the upright image size) without decoding pixels; with
    `paired`, the reference members too (the target's size alone decides the bucket)."""
    caption = read_caption(sample, caption_key)
    ext = image_member(sample)
    references = paired_references(sample) if paired else ()
    size = None
    if need_size:
        image = open_image(sample.files[ext], max_pixels)
        size = image.size
        try:
            if image.getexif().get(EXIF_ORIENTATION) in SWAPPING_ORIENTATIONS:
                size = (size[1], size[0])
        except Exception:  # unreadable EXIF: decode ignores it the same way
            pass
    return SampleInfo(caption, ext, size, references=references)


def has_alpha(image: Image.Image) -> bool:
    """Whether an opened image carries transparency."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def decode_pixels(data: bytes, *, height: int, width: int, channels: int, max_pixels: int) -> np.ndarray:
    """Decode, convert to `channels`, resize to cover (height, width) and center-crop: (height, width, C) uint8.

    Transparent images are composited on white (the usual background of product and clip-art images).
    """
    image = open_image(data, max_pixels)
    try:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; ask for the smallest that still covers the target
        # whichever way EXIF rotates it.
        side = max(width, height)
        image.draft(MODES[channels], (side, side))
        image = ImageOps.exif_transpose(image)
        if has_alpha(image):
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image.alpha_composite(rgba)
        image = image.convert(MODES[channels])
        image = resize_cover(image, height, width)
        return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    except Exception as err:  # truncated or corrupt pixel data shows up only here
        raise BadSample("undecodable image", f"{type(err).__name__}: {err}") from None


def pixels_to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, C) uint8 arrays into (B, C, H, W) float32 in [-1, 1] (one conversion per batch)."""
    return pixels_to_model(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)).contiguous()


def decode_references(sample: RawSample, info: SampleInfo, *, height: int, width: int, channels: int,
                      max_pixels: int) -> np.ndarray:
    """A paired sample's reference images at the target's size: (R, height, width, C) uint8 (see decode_pixels);
    BadSample("undecodable reference") when one of them does not decode."""
    try:
        return np.stack([decode_pixels(sample.files[ext], height=height, width=width, channels=channels,
                                       max_pixels=max_pixels) for ext in info.references])
    except BadSample as err:
        raise BadSample(UNDECODABLE_REFERENCE, f"{err.reason}: {err.detail}") from None


def decode_image(data: bytes, *, height: int, width: int, channels: int, max_pixels: int) -> torch.Tensor:
    """One image as (C, height, width) float32 in [-1, 1] (see decode_pixels)."""
    pixels = decode_pixels(data, height=height, width=width, channels=channels, max_pixels=max_pixels)
    return pixels_to_tensor([pixels])[0]


def resize_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers height x width (aspect kept), then crop the center."""
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    if (left, top, width, height) != (0, 0, new_w, new_h):
        image = image.crop((left, top, left + width, top + height))
    return image


def peek_cached(sample: RawSample, expect_encoders: Optional[dict[str, str]], paired: bool = False) -> SampleInfo:
    """Caption and feature shapes of a cached sample (the reference latents' shape among them); raises
    features.EncoderMismatch for foreign features. With `paired`, features without reference latents are a
    missing reference."""
    if features.EXT not in sample.files:
        raise BadSample("missing features", f"no .{features.EXT} member (is this a raw shard?)")
    try:
        header = features.read_header(sample.files[features.EXT])
    except ValueError as err:
        raise BadSample("unreadable features", str(err)) from None
    if expect_encoders is not None:
        features.check_encoders(header.encoders, expect_encoders, sample.url)
    if paired and not header.reference_shape:
        raise BadSample(MISSING_REFERENCE, "cached features without reference latents in a paired data set")
    try:
        caption = read_caption(sample)
    except BadSample:
        caption = ""  # captions are informational once the text is encoded
    return SampleInfo(caption, feature_key=(tuple(header.latent_shape), tuple(header.reference_shape)))


def decode_cached(sample: RawSample) -> features.Features:
    """The stored tensors (stored dtype). Their header was read by `peek_cached`, so a failure here is damage
    inside the tensor data: "corrupt features" when it does not load, "non-finite features" when it holds NaN or
    infinity (which would make every loss of its batch non-finite)."""
    try:
        loaded = features.decode(sample.files[features.EXT])
    except ValueError as err:
        raise BadSample("corrupt features", str(err)) from None
    try:
        features.check_finite(loaded)
    except ValueError as err:
        raise BadSample("non-finite features", str(err)) from None
    return loaded
