"""`flowmatch-data verify SHARDS`: read every member of every shard and list what is corrupt.

Checks the tar structure (truncation, unsafe member names, links), that images decode fully, that .txt is
UTF-8, .json parses and cached features load, and that each sample has what training needs (a caption and an
image, or cached features). Exit status 1 when anything is listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from flowmatch.data import decode, features
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS
from flowmatch.data.shards import expand_shards
from flowmatch.data.tarstream import BadRecord, RawSample, read_shard


@dataclass
class VerifyReport:
    """Shards read, samples seen, and one line per problem ("shard:key.ext: reason")."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)


def member_problems(sample: RawSample, max_pixels: int) -> list[str]:
    """Problems of one sample's members."""
    found = []
    for ext, data in sample.files.items():
        try:
            if ext in decode.IMAGE_EXTS:
                image = decode.open_image(data, max_pixels)
                image.load()
            elif ext == "txt":
                data.decode("utf-8")
            elif ext == "json":
                json.loads(data)
            elif ext == features.EXT:
                features.read_header(data)
                features.check_finite(features.decode(data))
        except decode.BadSample as err:
            found.append(f"{ext}: {err.reason} {err.detail}".rstrip())
        except Exception as err:  # whatever the decoder raised is the finding
            found.append(f"{ext}: {type(err).__name__}: {err}")
    cached = features.EXT in sample.files
    if not cached and not any(e in sample.files for e in decode.IMAGE_EXTS):
        found.append("no image member")
    if not cached:
        try:
            decode.read_caption(sample)
        except decode.BadSample as err:
            found.append(err.reason)
    return found


def verify(urls: Iterable[str], *, max_pixels: int = MAX_IMAGE_PIXELS) -> VerifyReport:
    """Check every shard in `urls`."""
    report = VerifyReport()
    for url in urls:
        report.shards += 1
        for record in read_shard(url):
            if isinstance(record, BadRecord):
                report.problems.append(str(record))
                continue
            report.samples += 1
            report.problems += [f"{url}:{record.key}.{p}" for p in member_problems(record, max_pixels)]
    return report


def verify_pattern(pattern: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> VerifyReport:
    """`verify` over a shards pattern; FileNotFoundError when it matches nothing."""
    urls = expand_shards(pattern)
    if not urls:
        raise FileNotFoundError(f"{pattern!r} matches no shards")
    return verify(urls, max_pixels=max_pixels)

