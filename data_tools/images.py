"""Checking image files before they go into shards: real format, full decode, bounded size."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from flowmatch.data.shardformat import MAX_IMAGE_PIXELS
# PIL format name -> the extension stored in the shard (one spelling per format, so the loader sees jpg not jpeg).
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SOURCE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


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
