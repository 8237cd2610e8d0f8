"""Read one shard as a stream of samples, never trusting it.

A sample is the consecutive tar members sharing a key (flowmatch.data.shardformat says how member names split
into key and extension, and which are unsafe). Problems never raise: they come out as `BadRecord`s in stream
order, so the loader can count them at a reproducible position and carry on. Not webdataset's tar iterators:
those raise out of the iteration on a truncated archive (losing the position) and check no member names;
webdataset's `gopen` still opens every URL kind (local paths, http, pipe: commands).
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Union

from webdataset.gopen import gopen

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


@dataclass
class BadRecord:
    """Something in a shard that was skipped; `reason` is a short fixed phrase used as a counter name."""

    url: str
    key: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.url}:{self.key}" if self.key else self.url
        return f"{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Record = Union[RawSample, BadRecord]


def read_shard(url: str, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Record]:
    """Yield the samples of shard `url` in archive order, with a BadRecord for each problem.

    A read error (truncated file, corrupt header or gzip data, failing pipe) ends the shard with one "truncated
    or corrupt shard" record; the sample it interrupted is dropped with it (its later members may be lost), the
    samples before it were already yielded.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # any opener failure (missing file, bad scheme) is a bad shard, not a crash
        yield BadRecord(url, "", "unreadable shard", f"{type(err).__name__}: {err}")
        return
    current: RawSample | None = None
    try:
        reader = TarReader(stream)
        for member in reader.members():
            name = member.name
            if member.kind == "dir":
                continue
            if unsafe_name(name):
                yield BadRecord(url, name, "unsafe member name", "absolute path or '..'")
                continue
            if member.kind != "file":
                yield BadRecord(url, name, "not a regular file", "links and devices are not read")
                continue
            if is_meta_name(name):
                continue
            parts = split_name(name)
            if parts is None:
                yield BadRecord(url, name, "member without extension")
                continue
            key, ext = parts
            if current is not None and key != current.key:
                yield current
                current = None
            if member.size > max_member_bytes:
                yield BadRecord(url, name, "oversized member", f"{member.size / MIB:.0f} MiB")
                continue
            data = reader.read(member)
            if current is None:
                current = RawSample(key, url)
            if ext in current.files:
                yield BadRecord(url, name, "duplicate member")
                continue
            current.files[ext] = data
        if current is not None:
            yield current
            current = None
    except READ_ERRORS as err:
        key = current.key if current is not None else ""
        yield BadRecord(url, key, "truncated or corrupt shard", f"{type(err).__name__}: {err}")
    finally:
        try:
            stream.close()
        except Exception:  # a pipe's non-zero exit after complete data, or one already seen as a read error
            pass
