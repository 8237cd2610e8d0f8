"""What a split's shards hold, read from their first samples: raw images or cached features (`detect_cached`),
and the cached features' header (`read_cache_header`: shapes and the fingerprints of the encoders that made them).
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

from flowmatch.data import decode
from flowmatch.data.config import DataConfig
from flowmatch.data.features import EXT as FEATURE_EXT
from flowmatch.data.features import FeatureHeader, read_header
from flowmatch.data.opener import RetryPolicy
from flowmatch.data.shards import resolve_split
from flowmatch.data.stream import DataUnavailable, shard_failure, unreadable_message
from flowmatch.data.tarstream import RawSample, read_shard

log = logging.getLogger("flowmatch.data")

# Shards looked at when auto-detecting cached features (the first readable sample decides).
DETECT_SHARDS = 3


def first_samples(urls: list[str], policy: RetryPolicy = RetryPolicy(),
                  unreadable: Optional[dict[str, str]] = None) -> Iterator[RawSample]:
    """The first sample of each of the first few readable shards; `unreadable` collects why the others failed."""
    for url in urls[:DETECT_SHARDS]:
        for record in read_shard(url, policy=policy):
            if isinstance(record, RawSample):
                yield record
                break
            why = shard_failure(record)
            if why is not None and unreadable is not None:
                unreadable.setdefault(url, why)


def detect_cached(urls: list[str], policy: RetryPolicy = RetryPolicy()) -> bool:
    """Whether the shards hold cached features (looks at the first readable sample); DataUnavailable when none of
    the shards looked at could be opened."""
    unreadable: dict[str, str] = {}
    for sample in first_samples(urls, policy, unreadable):
        return FEATURE_EXT in sample.files and not any(ext in sample.files for ext in decode.IMAGE_EXTS)
    tried = min(len(urls), DETECT_SHARDS)
    if unreadable and len(unreadable) == tried:
        raise DataUnavailable(unreadable_message(f"the data loader looked at the first {tried} of {len(urls)} "
                                                 "shards for a sample", unreadable, tried))
    log.warning("data: found no readable sample in %s; treating the shards as raw images", urls[:DETECT_SHARDS])
    return False


def read_cache_header(urls: list[str], policy: RetryPolicy = RetryPolicy()) -> Optional[FeatureHeader]:
    """Shapes and encoder fingerprints of the first cached sample, or None when the shards hold raw images."""
    for sample in first_samples(urls, policy):
        if FEATURE_EXT not in sample.files:
            return None
        return read_header(sample.files[FEATURE_EXT])
    return None


def read_cache_info(cfg: DataConfig, split: str = "train") -> Optional[FeatureHeader]:
    """For the trainer: the cached features' shapes and the encoders that made them (None for raw shards)."""
    return read_cache_header(list(resolve_split(cfg, split).urls), cfg.remote)
