"""Aspect-ratio buckets: a few (height, width) shapes of about the same area, so every bucket costs the same
number of transformer tokens and images keep their framing instead of being cropped square.

The shapes spread geometrically between 1 / max_aspect and max_aspect (width / height), as the multi-aspect
training of SDXL (Podell et al., 2023, sec. 2.3) and NovelAI's bucketing describe; each side is a multiple of
`multiple` (autoencoder downsampling x patch size) so the latent grid divides into patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """One training shape in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height


def make_buckets(height: int, width: int, count: int, *, max_aspect: float, multiple: int) -> list[Bucket]:
    """`count` buckets of about height x width pixels, from tallest to widest; duplicates after rounding merge.

    count <= 1 gives the single bucket (height, width) itself (rounded to `multiple`).
    """
    area = height * width
    if count <= 1:
        return [Bucket(round_to(height, multiple), round_to(width, multiple))]
    buckets: list[Bucket] = []
    for i in range(count):
        log_aspect = math.log(max_aspect) * (2 * i / (count - 1) - 1)
        aspect = math.exp(log_aspect)
        bucket = Bucket(round_to(math.sqrt(area / aspect), multiple), round_to(math.sqrt(area * aspect), multiple))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def round_to(value: float, multiple: int) -> int:
    """Nearest positive multiple of `multiple`."""
    return max(multiple, int(round(value / multiple)) * multiple)


def nearest_bucket(buckets: list[Bucket], width: int, height: int) -> int:
    """Index of the bucket whose aspect is closest to width / height in log space (so 2:1 and 1:2 are symmetric)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i].aspect) - target), i))
