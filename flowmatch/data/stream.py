"""One loader stream: the deterministic sequence of batches one (rank, worker) produces.

There are world_size x workers streams; stream `s` is a pure function of (seed, s) and the shards, which is what
makes the loader exact to resume and its coverage testable:

1. Records (flowmatch.data.plan): epoch mode reads the stream's share of every shard once per epoch; a weighted
   mixture of sources (data.sources) draws each next record's source with a seeded generator, and each source
   starts its next epoch on its own.
2. A seeded shuffle buffer (flowmatch.data.shuffle); in epoch mode it drains at the end of the epoch.
3. Groups: samples collect per bucket (image aspect, or cached latent shape; for paired data also the number
   of references, so a batch never mixes counts) until one holds batch_size; the end of an epoch flushes partial
   groups. Bad records ride along and are counted with the next group.
4. Decoding of a group into a Batch (flowmatch.data.collate; bad samples found here drop out of it).

A `Position` is what the stream holds between two batches, by reference: each reader's Place, the shuffle
buffer and the partial groups as record Refs, the generators' states and the counters. Resuming reads back the
referenced records (the shards in flight, from the offsets saved) and carries on, so its cost does not depend
on how far into the epoch the position is.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from flowmatch.data import decode
from flowmatch.data.batch import Batch
from flowmatch.data.buckets import Bucket, nearest_bucket
from flowmatch.data.collate import Group, decode_group
from flowmatch.data.opener import SHARD_FAILED, UNREADABLE, RetryPolicy
from flowmatch.data.plan import Place, Ref, SourceReader, fetch_records
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES
from flowmatch.data.shards import ShardSplit
from flowmatch.data.shuffle import ShuffleBuffer, load_rng, save_rng, seeded
from flowmatch.data.tarstream import BadRecord, RawSample, Record
from flowmatch.errors import UsageError

log = logging.getLogger("flowmatch.data")

# Log the first bad records of a stream one by one, then only every this many (a broken shard set should not
# bury the training log); all of them are counted.
LOG_FIRST_BAD = 20
LOG_EVERY_BAD = 1000


class DataUnavailable(RuntimeError, UsageError):
    """No batch can be made: the shards failed to open, or hold nothing usable; the message is one paragraph."""


def shard_failure(record: BadRecord) -> Optional[str]:
    """Why a record says its whole shard could not be read, or None for any other bad record."""
    if record.reason not in (SHARD_FAILED, UNREADABLE):
        return None
    return f"{record.reason}: {record.detail}" if record.detail else record.reason


def unreadable_message(what: str, failures: dict[str, str], tried: int) -> str:
    """One paragraph on shards that could not be read: how many of those `tried`, why, and the first URL."""
    why = "; ".join(f"{n} x {reason}" for reason, n in Counter(failures.values()).most_common(3))
    return (f"{what}: {len(failures)} of {tried} shards could not be read ({why}); the first that failed: "
            f"{next(iter(failures))}. Check the URLs and that the server is up (`flowmatch-data verify` reads "
            "shards one by one); for a flaky server raise data.remote.retries or data.remote.timeout_s.")


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream needs; plain data so it pickles into DataLoader workers."""

    sources: tuple[ShardSplit, ...]
    seed: int
    num_streams: int
    batch_size: int
    buckets: tuple[Bucket, ...]
    channels: int
    cached: bool
    mixture: bool = False
    """Draw records from the sources by weight, endlessly (the train split of data.sources); else one epoch
    reads every source once."""
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    drop_last: bool = False
    epochs: Optional[int] = None
    """Stop after this epoch (exclusive); None = run forever."""
    max_pixels: int = MAX_IMAGE_PIXELS
    max_member_bytes: int = MAX_MEMBER_BYTES
    masks: bool = False
    """Decode each sample's loss mask (flowmatch.data.masks) into Batch.masks."""
    alpha_masks: bool = False
    """With masks, an image's alpha channel is the mask of a sample without a mask.png."""
    expect_encoders: Optional[dict[str, str]] = None
    policy: RetryPolicy = RetryPolicy()
    paired: bool = False
    """Samples are paired (editing) data: each carries reference images (data.paired)."""
    urls: tuple[str, ...] = field(init=False)
    """Every source's shards, one after the other (Refs index into this)."""
    url_source: tuple[int, ...] = field(init=False)
    first_url: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        urls = [u for s in self.sources for u in s.urls]
        owner = [i for i, s in enumerate(self.sources) for _ in s.urls]
        firsts, n = [], 0
        for s in self.sources:
            firsts.append(n)
            n += len(s.urls)
        object.__setattr__(self, "urls", tuple(urls))
        object.__setattr__(self, "url_source", tuple(owner))
        object.__setattr__(self, "first_url", tuple(firsts))


@dataclass
class Position:
    """Where a stream stands after its latest yielded batch; counters are cumulative over the whole run.

    `detail` is None at the start of `epoch` (nothing read yet), else what the stream holds (see the module
    docstring): places, buffer refs, shuffle and mixture generators, partial groups and bad records not yet
    counted.
    """

    stream: int
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    sources: list[int] = field(default_factory=list)
    """Samples handed out per source."""
    detail: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict:
        out = {"epoch": self.epoch, "batch": self.batch, "samples": self.samples, "bad": dict(self.bad),
               "sources": list(self.sources)}
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, stream: int, d: dict) -> "Position":
        bad = {k: int(v) for k, v in d["bad"].items()}
        return cls(stream, int(d["epoch"]), int(d["batch"]), int(d["samples"]), bad,
                   [int(v) for v in d.get("sources", [])], d.get("detail"))


def flat(refs: list[Ref]) -> list[int]:
    return [v for ref in refs for v in ref]


def unflat(values: list[int]) -> list[Ref]:
    return [(int(values[i]), int(values[i + 1]), int(values[i + 2])) for i in range(0, len(values), 3)]


class Grouper:
    """Samples collecting per bucket until one bucket holds a batch; what it holds is saved as Refs."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.pending: dict[Any, list[tuple[RawSample, decode.SampleInfo, Ref]]] = {}
        self.bad: list[BadRecord] = []
        self.need_size = not spec.cached and len(spec.buckets) > 1

    def peek(self, record: RawSample) -> tuple[decode.SampleInfo, Any]:
        """The sample's info and its group key: the cached shapes, or (bucket index, reference count)."""
        spec = self.spec
        if spec.cached:
            info = decode.peek_cached(record, spec.expect_encoders, spec.paired)
            return info, info.feature_key
        info = decode.peek_raw(record, max_pixels=spec.max_pixels, need_size=self.need_size,
                               caption_key=spec.sources[record.source].caption_key, paired=spec.paired)
        bucket = nearest_bucket(list(spec.buckets), *info.size) if self.need_size else 0
        return info, (bucket, len(info.references))

    def add(self, record: Record, ref: Ref) -> Optional[Group]:
        """Take one record; the group it completes, if any."""
        if isinstance(record, BadRecord):
            self.bad.append(record)
            return None
        try:
            info, bucket = self.peek(record)
        except decode.BadSample as err:
            self.bad.append(BadRecord(record.url, record.key, err.reason, err.detail))
            return None
        members = self.pending.setdefault(bucket, [])
        members.append((record, info, ref))
        if len(members) < self.spec.batch_size:
            return None
        return self.take(bucket)

    def take(self, bucket: Any) -> Group:
        members = self.pending.pop(bucket)
        group = Group(bucket, [(r, i) for r, i, _ in members], self.bad)
        self.bad = []
        return group

    def flush(self) -> Iterator[Group]:
        """The partial groups (emptied when drop_last), then any bad records left over."""
        while self.pending:
            group = self.take(next(iter(self.pending)))
            if self.spec.drop_last:
                group.samples = []
            yield group
        if self.bad:
            yield Group(None, [], self.bad)
            self.bad = []

    def save(self) -> dict:
        """Partial groups as flat Refs, in the order they started (that is the order they flush in)."""
        return {"pending": [flat([ref for _, _, ref in members]) for members in self.pending.values()],
                "bad": [[b.url, b.key, b.reason, b.detail] for b in self.bad]}

    def load(self, saved: dict, records: dict[Ref, Record]) -> list[Group]:
        """Take back the saved partial groups; the groups they complete (only when the batch size is now smaller
        than when they were saved), to be emitted first."""
        self.bad = [BadRecord(*values) for values in saved["bad"]]
        ready = []
        for refs in saved["pending"]:
            for ref in unflat(refs):
                group = self.add(records[ref], ref)
                if group is not None:
                    ready.append(group)
        return ready


class StreamState:
    """The parts of a running stream: its readers, the mixture's generator, the shuffle buffer and the grouper."""

    def __init__(self, spec: StreamSpec, stream: int, epoch: int, detail: Optional[dict]) -> None:
        self.spec, self.stream = spec, stream
        n = len(spec.sources)
        self.grouper = Grouper(spec)
        self.ready: list[Group] = []
        self.weights = [0.0]
        if spec.mixture:
            total = sum(s.weight for s in spec.sources)
            for s in spec.sources:
                self.weights.append(self.weights[-1] + s.weight / total)
        if detail is None:
            places = [Place(epoch) for _ in range(n if spec.mixture else 1)]
            self.readers = self.make_readers(places)
            self.mix = seeded(f"mixture/{spec.seed}/{stream}")
            self.buffer = ShuffleBuffer(self.buffer_size, seeded(f"samples/{spec.seed}/{epoch}/{stream}"))
            return
        self.readers = self.make_readers([Place.from_list(p) for p in detail["places"]])
        self.mix = load_rng(detail["mixture"])
        refs = unflat(detail["buffer"])
        held = refs + [ref for r in detail["groups"]["pending"] for ref in unflat(r)]
        records = fetch_records(spec, held)
        self.buffer = ShuffleBuffer(self.buffer_size, load_rng(detail["shuffle"]), [(records[r], r) for r in refs])
        self.ready = self.grouper.load(detail["groups"], records)

    @property
    def buffer_size(self) -> int:
        return self.spec.shuffle_buffer if self.spec.shuffle and self.spec.shuffle_buffer > 1 else 0

    def make_readers(self, places: list[Place]) -> list[SourceReader]:
        if self.spec.mixture:
            return [SourceReader(self.spec, self.stream, [i], p) for i, p in enumerate(places)]
        return [SourceReader(self.spec, self.stream, range(len(self.spec.sources)), places[0])]

    @property
    def epoch(self) -> int:
        return min(r.place.epoch for r in self.readers)

    def save(self) -> dict:
        return {"places": [r.place.to_list() for r in self.readers], "mixture": save_rng(self.mix),
                "buffer": flat([ref for _, ref in self.buffer.items]), "shuffle": save_rng(self.buffer.rng),
                "groups": self.grouper.save()}

    def mixed_records(self) -> Iterator[tuple[Record, Ref]]:
        """Endless records of the weighted mixture: each next record from a source drawn by weight."""
        records = [reader.epoch_records() for reader in self.readers]
        empty_epochs = [0] * len(self.readers)
        while True:
            i = bisect.bisect_right(self.weights, float(self.mix.random())) - 1
            i = min(max(i, 0), len(self.readers) - 1)
            while True:
                item = next(records[i], None)
                if item is not None:
                    empty_epochs[i] = 0
                    yield item
                    break
                empty_epochs[i] += 1
                if empty_epochs[i] > 1:
                    raise DataUnavailable(f"data source {self.spec.sources[i].name or i} gave stream {self.stream} "
                                          "no record in a whole epoch: its shards are empty, unreadable or fewer "
                                          "than ranks x workers")
                self.readers[i].next_epoch()
                records[i] = self.readers[i].epoch_records()


def run_stream(spec: StreamSpec, start: Position) -> Iterator[tuple[Batch, Position]]:
    """Batches of stream `start.stream` from position `start`, each with the position after it."""
    stream = start.stream
    samples, bad, batch_index = start.samples, dict(start.bad), start.batch
    per_source = list(start.sources) + [0] * (len(spec.sources) - len(start.sources))
    state = StreamState(spec, stream, start.epoch, start.detail)

    seen: set[str] = set()  # the shards this epoch met
    unreadable: dict[str, str] = {}  # those of them that could not be opened, and why, in the order they failed

    def emit(group: Group) -> Iterator[tuple[Batch, Position]]:
        nonlocal samples, batch_index
        batch, failed, sources = decode_group(spec, group) if group.samples else (None, [], [])
        for record in group.bad + failed:
            why = shard_failure(record)
            if why is not None:
                unreadable.setdefault(record.url, why)
            bad[record.reason] = bad.get(record.reason, 0) + 1
            total = sum(bad.values())
            if total <= LOG_FIRST_BAD or total % LOG_EVERY_BAD == 0:
                log.warning("data: skipped %s [stream %d, %d bad so far]", record, stream, total)
        if batch is None:
            return
        samples += len(batch)
        batch_index += 1
        for s in sources:
            per_source[s] += 1
        yield batch, Position(stream, state.epoch, batch_index, samples, dict(bad), list(per_source), state.save())

    def take(record: Record, ref: Ref) -> Iterator[tuple[Batch, Position]]:
        seen.add(record.url)
        out = state.buffer.push((record, ref))
        if out is not None:
            group = state.grouper.add(*out)
            if group is not None:
                yield from emit(group)

    for group in state.ready:
        yield from emit(group)
    if spec.mixture:
        for record, ref in state.mixed_records():
            yield from take(record, ref)
        return
    reader = state.readers[0]
    while spec.epochs is None or reader.place.epoch < spec.epochs:
        made = samples
        for record, ref in reader.epoch_records():
            yield from take(record, ref)
        while len(state.buffer):
            group = state.grouper.add(*state.buffer.pop())
            if group is not None:
                yield from emit(group)
        for group in state.grouper.flush():
            yield from emit(group)
        if samples == made and start.detail is None and spec.epochs is None:
            if unreadable and len(unreadable) == len(seen):
                raise DataUnavailable(unreadable_message(f"data stream {stream} made no batch in a whole epoch",
                                                         unreadable, len(seen)))
            raise DataUnavailable(
                f"data stream {stream} made no batch in a whole epoch of {list(spec.urls)[:4]}... "
                f"(bad so far: {bad or 'none'}): the shards are empty or broken, or hold fewer samples than "
                "ranks x workers (x batch size with data.drop_last); check them with `flowmatch-data verify`, "
                "or lower data.num_workers"
            )
        epoch = reader.place.epoch + 1
        reader.next_epoch()
        state.buffer = ShuffleBuffer(state.buffer_size, seeded(f"samples/{spec.seed}/{epoch}/{stream}"))
        batch_index, start = 0, Position(stream)
        seen.clear()
        unreadable.clear()


def start_positions(streams) -> dict[int, Position]:
    """Fresh positions for `streams`."""
    return {s: Position(s) for s in streams}


def advance_epoch(position: Position, epoch: int) -> Position:
    """`position` moved to the start of `epoch`, keeping its counters."""
    return Position(position.stream, epoch, 0, position.samples, dict(position.bad), list(position.sources))
