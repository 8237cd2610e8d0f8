"""Training data: WebDataset shards streamed into `Batch`es, split over ranks and workers, exact to resume.

    from flowmatch.data import DataConfig, build_loader, ensure_shards
    ensure_shards(cfg.data)                     # rank 0 first, then a barrier
    loader = build_loader(cfg.data, rank=r, world_size=n, batch_size=b, seed=s)
    for batch in loader: ...                    # Batch(images | latents + text, captions, keys)
    state = loader.state_dict()                 # into the checkpoint; loader.load_state_dict(state) resumes

Shards are local files, http(s) URLs or pipe: commands, all opened by `flowmatch.data.opener` (retries, timeouts,
byte offsets); `data.sources` mixes several data sets by weight. A saved position names the records a stream
holds (flowmatch.data.stream), so resuming reads only the shards in flight.

What a shard is (member names, held-out naming, size limits) and the one writer that makes shards:
`flowmatch.data.shardformat`. The pixel range of model inputs and outputs: `flowmatch.data.pixels`.
"""

from flowmatch.data.batch import Batch
from flowmatch.data.config import DataConfig, SourceConfig
from flowmatch.data.features import EncoderMismatch, FeatureHeader
from flowmatch.data.loader import Loader, LoaderStats, build_loader, merge_loader_states
from flowmatch.data.opener import RetryPolicy
from flowmatch.data.probe import read_cache_info
from flowmatch.data.shards import ensure_shards, expand_shards, has_val_split, resolve_split
from flowmatch.data.stream import DataUnavailable

__all__ = [
    "Batch",
    "DataConfig",
    "DataUnavailable",
    "EncoderMismatch",
    "FeatureHeader",
    "Loader",
    "LoaderStats",
    "RetryPolicy",
    "SourceConfig",
    "build_loader",
    "ensure_shards",
    "expand_shards",
    "has_val_split",
    "merge_loader_states",
    "read_cache_info",
    "resolve_split",
]
