"""Read one shard as a stream of samples, never trusting it.

A sample is the consecutive tar members sharing a key (flowmatch.data.shardformat says how member names split
into key and extension, and which are unsafe). Problems never raise: they come out as `BadRecord`s in stream
order, so the loader can count them at a reproducible position and carry on. Not webdataset's tar iterators:
those raise out of the iteration on a truncated archive (losing the position) and check no member names. Every
URL kind is opened by flowmatch.data.opener (retries, timeouts, byte offsets).

Every record carries its place: (`offset`, `skip`) says that reading the shard from archive offset `offset` and
dropping `skip` records gives this record first. Offsets are those of sample starts, where the reader holds
nothing over, so a place stays valid on its own: a resumed loader reopens a shard at the place it saved
(`read_shard(url, start=offset, skip=skip)`), seeking there when the shard allows it.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Union

from flowmatch.data.opener import RetryPolicy, ShardUnavailable, open_shard
from flowmatch.data.shardformat import MAX_MEMBER_BYTES, MIB, is_meta_name, split_name, unsafe_name
from flowmatch.data.tarformat import TarError, TarReader

# Truncated or corrupt archives surface as any of these (the decompressors raise their own types).
READ_ERRORS = (TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


@dataclass
class RawSample:
    """Undecoded sample: its key, the shard it came from and its members by lower-case extension."""

    key: str
    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0
    skip: int = 0
    source: int = 0
    """Index of the data source (data.sources) the shard belongs to."""


@dataclass
class BadRecord:
    """Something in a shard that was skipped; `reason` is a short fixed phrase used as a counter name."""

    url: str
    key: str
    reason: str
    detail: str = ""
    offset: int = 0
    skip: int = 0

    def __str__(self) -> str:
        where = f"{self.url}:{self.key}" if self.key else self.url
        return f"{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Record = Union[RawSample, BadRecord]


def read_shard(url: str, *, max_member_bytes: int = MAX_MEMBER_BYTES, start: int = 0, skip: int = 0,
               policy: RetryPolicy = RetryPolicy()) -> Iterator[Record]:
    """Yield the samples of shard `url` in archive order, with a BadRecord for each problem.

    `start`, `skip`: begin at a saved place (a record's `offset` and `skip`; see the module docstring).
    A read error (truncated file, corrupt header or gzip data, failing pipe) ends the shard with one "truncated
    or corrupt shard" record, and a remote shard that failed after every retry with one "shard failed after
    retries" record; the sample it interrupted is dropped with it (its later members may be lost), the samples
    before it were already yielded.
    """
    chunk, index = start, 0  # the place of the next record: `index` records read since archive offset `chunk`

    def placed(record: Record) -> Iterator[Record]:
        nonlocal index
        record.offset, record.skip = chunk, index
        index += 1
        if record.skip >= skip or chunk != start:
            yield record

    try:
        stream, positioned = open_shard(url, start, policy)
    except ShardUnavailable as err:
        yield from placed(BadRecord(url, "", err.reason, str(err)))
        return
    except Exception as err:  # any other opener failure (bad scheme) is a bad shard, not a crash
        yield from placed(BadRecord(url, "", "unreadable shard", f"{type(err).__name__}: {err}"))
        return
    current: RawSample | None = None
    try:
        reader = TarReader(stream, start=start, positioned=positioned)
        for member in reader.members():
            name = member.name
            if member.kind == "dir":
                continue
            if unsafe_name(name):
                yield from placed(BadRecord(url, name, "unsafe member name", "absolute path or '..'"))
                continue
            if member.kind != "file":
                yield from placed(BadRecord(url, name, "not a regular file", "links and devices are not read"))
                continue
            if is_meta_name(name):
                continue
            parts = split_name(name)
            if parts is None:
                yield from placed(BadRecord(url, name, "member without extension"))
                continue
            key, ext = parts
            if current is not None and key != current.key:
                yield from placed(current)
                current = None
                chunk, index = member.offset, 0  # nothing is held over here: a place to restart from
            if member.size > max_member_bytes:
                yield from placed(BadRecord(url, name, "oversized member", f"{member.size / MIB:.0f} MiB"))
                continue
            data = reader.read(member)
            if current is None:
                current = RawSample(key, url)
            if ext in current.files:
                yield from placed(BadRecord(url, name, "duplicate member"))
                continue
            current.files[ext] = data
        if current is not None:
            yield from placed(current)
            current = None
    except ShardUnavailable as err:
        key = current.key if current is not None else ""
        yield from placed(BadRecord(url, key, err.reason, str(err)))
    except READ_ERRORS as err:
        key = current.key if current is not None else ""
        yield from placed(BadRecord(url, key, "truncated or corrupt shard", f"{type(err).__name__}: {err}"))
    finally:
        try:
            stream.close()
        except Exception:  # a pipe's non-zero exit after complete data, or one already seen as a read error
            pass
