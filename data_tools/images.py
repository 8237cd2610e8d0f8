"""Checking image files before they go into shards: real format, full decode, bounded size; and the reference
images of paired (editing) samples, named by a field of their metadata."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_REFERENCES, reference_ext

# PIL format name -> the extension stored in the shard (one spelling per format, so the loader sees jpg not jpeg).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SOURCE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
REFERENCE_FIELD = "reference"
"""The default metadata field naming a sample's reference image(s): a path or URL, or a list of them."""


class ImageRejected(Exception):
    """The bytes are not a usable image; str(err) is the reason."""


def check_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Fully decode `data` and return the shard extension of its real format (jpg, png, webp).

    Raises ImageRejected for undecodable or truncated data, an unsupported format, or more than max_pixels pixels
    (checked from the header, before decoding, so a decompression bomb costs nothing).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageRejected(f"oversized image {image.width}x{image.height} (limit {max_pixels} pixels)")
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"oversized image: {err}") from None
    except Exception as err:  # PIL raises many types for broken files (UnidentifiedImageError, OSError, SyntaxError)
        raise ImageRejected(f"undecodable image ({type(err).__name__}: {err})") from None
    ext = FORMAT_EXT.get(image.format or "")
    if ext is None:
        raise ImageRejected(f"unsupported image format {image.format} (use png, jpg or webp)")
    return ext


def reference_sources(meta: dict, field: str) -> list[str]:
    """The reference image(s) `meta[field]` names, in order ([] when the field is absent); ValueError when it is
    not a non-empty string or a list of them, or names more than MAX_REFERENCES."""
    value = meta.get(field)
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"bad reference field {field!r} (a path or a list of paths, got {value!r})")
    if len(names) > MAX_REFERENCES:
        raise ValueError(f"too many references ({len(names)} > {MAX_REFERENCES})")
    return [n.strip() for n in names]


def reference_files(images: list[bytes], *, max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, bytes]:
    """The shard members of a paired sample's reference images: {"ref.png": ..., "ref_1.jpg": ...}; each image is
    checked as `check_image` does (ImageRejected, its reason prefixed with which reference failed)."""
    members = {}
    for index, data in enumerate(images):
        try:
            ext = check_image(data, max_pixels=max_pixels)
        except ImageRejected as err:
            raise ImageRejected(f"reference {index}: {err}") from None
        members[reference_ext(index, ext)] = data
    return members
