"""One loader stream: the deterministic sequence of batches one (rank, worker) produces.

There are world_size x workers streams; stream `s` of epoch `e` is a pure function of (seed, e, s) and the
shards, which is what makes the loader exact to resume and its coverage testable:

1. Shard plan. Epoch mode: every stream permutes the shard list with the same (seed, epoch) generator and takes
   shards s, s + N, ...; the last `len(shards) % N` shards are shared, each read by several streams that keep
   every k-th sample, so each sample belongs to exactly one stream and streams stay balanced even with fewer
   shards than streams. Resampled mode: each stream draws ceil(shards / N) shards with replacement per
   pseudo-epoch from a (seed, stream, epoch) generator.
2. Records from each shard (tarstream), the holdout filter, then a seeded shuffle buffer.
3. Groups: samples collect per bucket (image aspect, or cached latent shape) until one holds batch_size; the
   end of an epoch flushes partial groups. Bad records ride along and are counted with the next group.
4. Decoding of a group into a Batch (bad samples found here drop out of it).

A position is (epoch, groups done in that epoch). Resuming replays the epoch's steps 1-3, which read only tar
bytes and image headers, skips that many groups, and decodes from there on.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional

import torch

from flowmatch.data import decode
from flowmatch.data.batch import Batch
from flowmatch.data.buckets import Bucket, nearest_bucket
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES
from flowmatch.data.shards import ShardSplit
from flowmatch.data.tarstream import BadRecord, RawSample, Record, read_shard
from flowmatch.encoders.conditioning import Conditioning

log = logging.getLogger("flowmatch.data")

# Log the first bad records of a stream one by one, then only every this many (a broken shard set should not
# bury the training log); all of them are counted.
LOG_FIRST_BAD = 20
LOG_EVERY_BAD = 1000


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream needs; plain data so it pickles into DataLoader workers."""

    split: ShardSplit
    seed: int
    num_streams: int
    batch_size: int
    buckets: tuple[Bucket, ...]
    channels: int
    cached: bool
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    drop_last: bool = False
    epochs: Optional[int] = None
    """Stop after this epoch (exclusive); None = run forever."""
    max_pixels: int = MAX_IMAGE_PIXELS
    max_member_bytes: int = MAX_MEMBER_BYTES
    expect_encoders: Optional[dict[str, str]] = None


@dataclass
class Position:
    """Where a stream stands after its latest yielded batch; counters are cumulative over the whole run."""

    stream: int
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "samples": self.samples, "bad": dict(self.bad)}

    @classmethod
    def from_dict(cls, stream: int, d: dict) -> "Position":
        bad = {k: int(v) for k, v in d["bad"].items()}
        return cls(stream, int(d["epoch"]), int(d["batch"]), int(d["samples"]), bad)


@dataclass(frozen=True)
class ShardTask:
    """Read `url`, keeping the records whose index i satisfies i % every == offset."""

    url: str
    every: int = 1
    offset: int = 0


@dataclass
class Group:
    """Samples of one bucket that will make one batch, plus the bad records met since the previous group."""

    bucket: object
    samples: list[tuple[RawSample, decode.SampleInfo]]
    bad: list[BadRecord]


def epoch_tasks(spec: StreamSpec, stream: int, epoch: int) -> list[ShardTask]:
    """The shards stream `stream` reads in `epoch` (see the module docstring)."""
    urls, n = list(spec.split.urls), spec.num_streams
    if spec.resampled:
        rng = random.Random(f"resample/{spec.seed}/{stream}/{epoch}")
        return [ShardTask(rng.choice(urls)) for _ in range(max(1, math.ceil(len(urls) / n)))]
    if spec.shuffle:
        random.Random(f"shards/{spec.seed}/{epoch}").shuffle(urls)
    whole = len(urls) // n * n
    tasks = [ShardTask(u) for u in urls[:whole][stream::n]]
    rest = urls[whole:]
    if rest:
        shard = stream % len(rest)
        tasks.append(ShardTask(rest[shard], len(range(shard, n, len(rest))), stream // len(rest)))
    return tasks


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Seeded buffer shuffle: hold `size` items, emit a random one as each new one arrives, then the rest."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def epoch_records(spec: StreamSpec, stream: int, epoch: int) -> Iterator[Record]:
    """Records (samples and bad records) of one stream's epoch, in their final shuffled order."""

    def read() -> Iterator[Record]:
        for task in epoch_tasks(spec, stream, epoch):
            index = 0
            for record in read_shard(task.url, max_member_bytes=spec.max_member_bytes):
                if isinstance(record, RawSample) and not spec.split.keeps(record.key):
                    continue
                if index % task.every == task.offset:
                    yield record
                index += 1

    if not spec.shuffle or spec.shuffle_buffer <= 1:
        return read()
    return shuffled(read(), spec.shuffle_buffer, random.Random(f"samples/{spec.seed}/{epoch}/{stream}"))


def group_records(spec: StreamSpec, records: Iterable[Record]) -> Iterator[Group]:
    """Batch-sized groups per bucket, in the order they fill; partial groups flush at the end (unless drop_last)."""
    pending: dict[object, list] = {}
    bad: list[BadRecord] = []
    need_size = not spec.cached and len(spec.buckets) > 1
    for record in records:
        if isinstance(record, BadRecord):
            bad.append(record)
            continue
        try:
            if spec.cached:
                info = decode.peek_cached(record, spec.expect_encoders)
                bucket: object = info.feature_key
            else:
                info = decode.peek_raw(record, max_pixels=spec.max_pixels, need_size=need_size)
                bucket = nearest_bucket(list(spec.buckets), *info.size) if need_size else 0
        except decode.BadSample as err:
            bad.append(BadRecord(record.url, record.key, err.reason, err.detail))
            continue
        members = pending.setdefault(bucket, [])
        members.append((record, info))
        if len(members) == spec.batch_size:
            yield Group(bucket, pending.pop(bucket), bad)
            bad = []
    for bucket, members in pending.items():
        yield Group(bucket, [] if spec.drop_last else members, bad)
        bad = []
    if bad:
        yield Group(None, [], bad)


def decode_group(spec: StreamSpec, group: Group) -> tuple[Optional[Batch], list[BadRecord]]:
    """The group's Batch (None when every sample failed) and the samples that failed to decode."""
    kept: list[tuple[RawSample, decode.SampleInfo]] = []
    tensors: list = []
    failed: list[BadRecord] = []
    for record, info in group.samples:
        try:
            if spec.cached:
                tensors.append(decode.decode_cached(record))
            else:
                target = spec.buckets[group.bucket]
                data = record.files[info.image_ext]
                tensors.append(
                    decode.decode_pixels(
                        data, height=target.height, width=target.width, channels=spec.channels,
                        max_pixels=spec.max_pixels,
                    )
                )
            kept.append((record, info))
        except decode.BadSample as err:
            failed.append(BadRecord(record.url, record.key, err.reason, err.detail))
    if not kept:
        return None, failed
    captions = [info.caption for _, info in kept]
    keys = [record.key for record, _ in kept]
    meta = [sample_meta(record) for record, _ in kept]
    if spec.cached:
        latents = torch.stack([f.latents for f in tensors]).float()
        if tensors[0].parts:  # several text encoders: each re-padded on its own, combined by the encoders
            parts = {n: Conditioning.from_rows([f.parts[n][0] for f in tensors], [f.parts[n][1] for f in tensors])
                     for n in tensors[0].parts}
            return Batch(captions, keys, latents=latents, meta=meta, text_parts=parts), failed
        text = Conditioning.from_rows([f.hidden for f in tensors], [f.pooled for f in tensors])
        return Batch(captions, keys, latents=latents, text=text, meta=meta), failed
    return Batch(captions, keys, images=decode.pixels_to_tensor(tensors), meta=meta), failed


def sample_meta(record: RawSample) -> dict:
    """The sample's .json as a dict ({} when absent or not an object)."""
    try:
        meta = json.loads(record.files["json"]) if "json" in record.files else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_stream(spec: StreamSpec, start: Position) -> Iterator[tuple[Batch, Position]]:
    """Batches of stream `start.stream` from position `start`, each with the position after it."""
    stream = start.stream
    epoch, skip = start.epoch, start.batch
    samples, bad = start.samples, dict(start.bad)
    while spec.epochs is None or epoch < spec.epochs:
        made_batch = False  # guards against spinning forever over shards that never yield a batch
        for index, group in enumerate(group_records(spec, epoch_records(spec, stream, epoch))):
            if index < skip:
                made_batch = made_batch or bool(group.samples)
                continue
            batch, failed = decode_group(spec, group) if group.samples else (None, [])
            for record in group.bad + failed:
                bad[record.reason] = bad.get(record.reason, 0) + 1
                total = sum(bad.values())
                if total <= LOG_FIRST_BAD or total % LOG_EVERY_BAD == 0:
                    log.warning("data: skipped %s [stream %d, %d bad so far]", record, stream, total)
            if batch is None:
                continue
            samples += len(batch)
            made_batch = True
            yield batch, Position(stream, epoch, index + 1, samples, dict(bad))
        if not made_batch and spec.epochs is None:
            raise RuntimeError(
                f"data stream {stream} made no batch in a whole epoch of {list(spec.split.urls)[:4]}... "
                f"(bad so far: {bad or 'none'}): the shards are empty or broken, or hold fewer samples than "
                "ranks x workers (x batch size with data.drop_last); check them with `flowmatch-data verify`, "
                "or lower data.num_workers"
            )
        epoch, skip = epoch + 1, 0


def start_positions(streams: Iterable[int]) -> dict[int, Position]:
    """Fresh positions for `streams`."""
    return {s: Position(s) for s in streams}


def advance_epoch(position: Position, epoch: int) -> Position:
    """`position` moved to the start of `epoch`, keeping its counters."""
    return replace(position, epoch=epoch, batch=0)
