"""Which records one loader stream reads, and where it stands in them.

A stream's shard plan for an epoch is a pure function of (seed, epoch, stream) and the shard list:

- Epoch mode: every stream permutes a source's shard list with the same (seed, epoch) generator and takes shards
  s, s + N, ...; the last `len(shards) % N` shards are shared, each read by several streams that keep every k-th
  record, so each sample belongs to exactly one stream and streams stay balanced even with fewer shards than
  streams. Resampled mode: each stream draws ceil(shards / N) shards with replacement per pseudo-epoch from a
  (seed, stream, epoch) generator.
- A `SourceReader` walks the plan and remembers its `Place` after every record it hands out: (epoch, task in the
  plan, and the record's place inside that shard, see flowmatch.data.tarstream). Restarting from a Place opens one
  shard, at the byte it names.
- A record handed on is known by its `Ref`, (url index, archive offset, skip): enough to read it again alone
  (`fetch_records`), which is how a resumed stream refills its shuffle buffer and partial batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from flowmatch.data.opener import can_seek, looks_compressed
from flowmatch.data.tarstream import BadRecord, RawSample, Record, read_shard

if TYPE_CHECKING:
    from flowmatch.data.stream import StreamSpec

Ref = tuple[int, int, int]
"""(index of the shard in StreamSpec.urls, archive offset, records to skip there): one record, readable alone."""
MISSING_ON_RESUME = "record missing on resume"
SEEK_GAP = 4 << 20
"""Places further apart than this (bytes) are reached by a seek or a new range request instead of reading on."""


@dataclass(frozen=True)
class ShardTask:
    """Read shard `url` (an index into StreamSpec.urls), keeping the records whose index i has i % every == offset."""

    url: int
    every: int = 1
    offset: int = 0


@dataclass
class Place:
    """Where a reader stands: the next record is the `skip`-th from archive offset `offset` of task `task` of
    epoch `epoch`'s plan; `index` records of that task passed the split's key filter so far."""

    epoch: int = 0
    task: int = 0
    offset: int = 0
    skip: int = 0
    index: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.task, self.offset, self.skip, self.index]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Place":
        return cls(*(int(v) for v in values))


def source_tasks(spec: "StreamSpec", source: int, stream: int, epoch: int) -> list[ShardTask]:
    """The shards of source `source` that stream `stream` reads in `epoch` (see the module docstring)."""
    first = spec.first_url[source]
    urls = list(range(first, first + len(spec.sources[source].urls)))
    n = spec.num_streams
    if spec.resampled:
        rng = random.Random(f"resample/{spec.seed}/{source}/{stream}/{epoch}")
        return [ShardTask(rng.choice(urls)) for _ in range(max(1, math.ceil(len(urls) / n)))]
    if spec.shuffle:
        random.Random(f"shards/{spec.seed}/{source}/{epoch}").shuffle(urls)
    whole = len(urls) // n * n
    tasks = [ShardTask(u) for u in urls[:whole][stream::n]]
    rest = urls[whole:]
    if rest:
        shard = stream % len(rest)
        tasks.append(ShardTask(rest[shard], len(range(shard, n, len(rest))), stream // len(rest)))
    return tasks


class SourceReader:
    """The records of some sources for one stream, one epoch at a time, from a Place on.

    Epoch mode reads every source of the split in one epoch (their plans one after the other); a mixture gives
    each source its own reader, which starts its next epoch whenever the mixture asks for more.
    """

    def __init__(self, spec: "StreamSpec", stream: int, sources: Sequence[int], place: Place) -> None:
        self.spec, self.stream, self.sources = spec, stream, tuple(sources)
        self.place = place

    def tasks(self, epoch: int) -> list[ShardTask]:
        return [t for s in self.sources for t in source_tasks(self.spec, s, self.stream, epoch)]

    def epoch_records(self) -> Iterator[tuple[Record, Ref]]:
        """What is left of the current epoch; `place` follows each record handed out."""
        spec, p = self.spec, self.place
        tasks = self.tasks(p.epoch)
        while p.task < len(tasks):
            task = tasks[p.task]
            url = spec.urls[task.url]
            split = spec.sources[spec.url_source[task.url]]
            for record in read_shard(url, start=p.offset, skip=p.skip, max_member_bytes=spec.max_member_bytes,
                                     policy=spec.policy):
                p.offset, p.skip = record.offset, record.skip + 1
                if isinstance(record, RawSample):
                    record.source = spec.url_source[task.url]
                    if not split.keeps(record.key):
                        continue
                index, p.index = p.index, p.index + 1
                if index % task.every == task.offset:
                    yield record, (task.url, record.offset, record.skip)
            p.task, p.offset, p.skip, p.index = p.task + 1, 0, 0, 0

    def next_epoch(self) -> None:
        self.place = Place(self.place.epoch + 1)


def fetch_records(spec: "StreamSpec", refs: Iterable[Ref]) -> dict[Ref, Record]:
    """Read the records `refs` name, each shard from its first place named on; in shards that can start at a byte
    offset, a gap of more than SEEK_GAP bytes between two places is jumped (a seek, a new range request) rather
    than read through. A ref no longer found (the shard changed) becomes a BadRecord."""
    wanted: dict[int, set[tuple[int, int]]] = {}
    for url, offset, skip in refs:
        wanted.setdefault(url, set()).add((offset, skip))
    found: dict[Ref, Record] = {}
    for u, places in wanted.items():
        url = spec.urls[u]
        seekable = can_seek(url) and not looks_compressed(url)
        runs: list[set[tuple[int, int]]] = []
        last = None
        for place in sorted(places):
            if last is None or (seekable and place[0] - last > SEEK_GAP):
                runs.append(set())
            runs[-1].add(place)
            last = place[0]
        for run in runs:
            start, skip = min(run)
            records = read_shard(url, start=start, skip=skip, policy=spec.policy,
                                 max_member_bytes=spec.max_member_bytes)
            collect(spec, u, records, run, found)
        for offset, skip in places:
            if (u, offset, skip) not in found:
                found[(u, offset, skip)] = BadRecord(url, "", MISSING_ON_RESUME, f"offset {offset}, record {skip}")
    return found


def collect(spec: "StreamSpec", u: int, records: Iterator[Record], places: set[tuple[int, int]],
            found: dict[Ref, Record]) -> None:
    """Take the records at `places` from `records` (stopping as soon as all are found)."""
    try:
        for record in records:
            place = (record.offset, record.skip)
            if place in places:
                if isinstance(record, RawSample):
                    record.source = spec.url_source[u]
                found[(u, *place)] = record
                places.discard(place)
                if not places:
                    return
    finally:
        records.close()  # type: ignore[attr-defined]
