"""The shard format: what a flowmatch shard is, and the one writer that makes shards.

A shard is a tar file (plain, or gzip/bzip2/xz compressed) of samples. A sample is the consecutive members sharing
a key: `dir/abc.jpg`, `dir/abc.txt` -> key `dir/abc`, files {"jpg": ..., "txt": ...} (the WebDataset convention:
the extension is everything after the first dot of the file name). A paired (editing) sample adds its reference
images as `abc.ref.jpg`, `abc.ref_1.png`, ... (`reference_ext`, `reference_members`): its own image is the
target and its caption the instruction. A key is written only if the reader gives it back unchanged and it is
safe to extract (`check_key`); new keys are made of letters, digits, '_' and '-' (`safe_key`). Shards whose file
name starts with `val-` hold out data: they are never trained on. Every reader and writer takes its limits from
here, so a shard the writers accept is one the loader reads.

Writing is deterministic: the same samples give byte-identical shards (fixed member time, owner and mode; members
of a sample sorted by extension; gzip without a time stamp), which keeps rebuilt shards, test fixtures and
encoded caches comparable. Members are written by webdataset's TarWriter; the numbering, checks and atomic
rename are added here.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import BinaryIO, Mapping, Optional, Union

from webdataset import TarWriter

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
GZIP_SUFFIXES = (".tar.gz", ".tgz")
VAL_PREFIX = "val"
"""Shards named `val-*` (written with prefix=VAL_PREFIX) are the held-out split."""
TRAIN_PREFIX = "train"

MIB = 1 << 20
MAX_MEMBER_BYTES = 256 * MIB
"""Largest member a writer stores and the loader reads (data.max_member_mb); no training sample needs more."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image (width x height) accepted into shards and decoded by the loader (data.max_image_pixels)."""
MAX_SHARD_BYTES = 3_000_000_000
"""A shard is closed once it holds this many bytes even if it has fewer samples (webdataset's ShardWriter bound)."""

FIXED_MTIME = 1577836800
"""Member modification time of every shard written (2020-01-01 UTC): fixed so rebuilding is reproducible."""
GZIP_LEVEL = 9

# Member names: key = path up to the first dot of the file name (the same split as webdataset's base_plus_ext).
MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META_RE = re.compile(r"(^|/)__[^/]*__($|/)")
PREFIX_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
EXT_OK = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


REFERENCE = "ref"
"""The reference images of a paired sample: member extensions `ref.EXT`, `ref_1.EXT`, `ref_2.EXT`, ..."""
REFERENCE_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_REFERENCES = 8
"""Most reference images one paired sample may name (the writers refuse more; the loader reads no further)."""


def reference_ext(index: int, image_ext: str) -> str:
    """The member extension of reference `index` (0-based) stored as `image_ext`: `ref.png`, `ref_1.png`, ..."""
    if not 0 <= index < MAX_REFERENCES:
        raise ValueError(f"reference index {index} outside [0, {MAX_REFERENCES})")
    return f"{REFERENCE}.{image_ext}" if index == 0 else f"{REFERENCE}_{index}.{image_ext}"


def reference_members(exts) -> tuple[list[str], bool]:
    """(the member extensions of a sample's references in order, whether that sequence has a gap).

    `exts` are the sample's member extensions. References count from `ref` up through `ref_1`, `ref_2`, ...; a
    sample naming `ref_2` without `ref_1` (or `ref_1` without `ref`) has a gap: one of its references is missing.
    """
    by_index: dict[int, str] = {}
    for ext in exts:
        name, _, image = ext.partition(".")
        if image not in REFERENCE_IMAGE_EXTS:
            continue
        if name == REFERENCE:
            by_index.setdefault(0, ext)
        elif name.startswith(REFERENCE + "_") and name[len(REFERENCE) + 1:].isdigit():
            index = int(name[len(REFERENCE) + 1:])
            if 0 < index < MAX_REFERENCES:
                by_index.setdefault(index, ext)
    count = 0
    while count in by_index:
        count += 1
    return [by_index[i] for i in range(count)], len(by_index) != count


def unsafe_name(name: str) -> bool:
    """Absolute paths and `..` components are refused even though nothing is extracted to disk: tools downstream
    (tar -x, extract scripts) would write outside their directory."""
    return name.startswith("/") or name.startswith("\\") or ".." in re.split(r"[/\\]", name) or ":" in name[:3]


def split_name(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case extension) of a member name, or None when the name has no extension."""
    match = MEMBER_RE.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def is_meta_name(name: str) -> bool:
    """Members such as `__index__` carry no sample (readers skip them)."""
    return bool(META_RE.search(name))


def safe_key(name: str) -> str:
    """A sample key from any name: runs of characters other than letters, digits, '_' and '-' become '_'.

    Dots must go (the extension starts at the first dot of the file name), and so must '/' and '..' (a key is a
    member name inside the tar).
    """
    key = UNSAFE_CHARS.sub("_", name).strip("_")
    return key or "sample"


def check_key(key: str) -> None:
    """ValueError for a key that would make an unsafe member name or not come back as itself from the reader (a dot
    in its last part, an empty part, a `__meta__` part, a backslash or a control character)."""
    parts = key.split("/")
    if (unsafe_name(key) or not all(parts) or "." in parts[-1] or is_meta_name(key) or "\\" in key
            or any(ord(c) < 32 for c in key)):
        raise ValueError(f"sample key {key!r} would not read back as itself (make keys with shardformat.safe_key)")


def is_val_name(file_name: str) -> bool:
    """Whether a shard file name marks held-out data."""
    return file_name.startswith(VAL_PREFIX + "-")


def shard_file_name(prefix: str, index: int) -> str:
    """`PREFIX-000000.tar`: the name writers give shard `index` of a set."""
    return f"{prefix}-{index:06d}.tar"


class ShardFile:
    """One shard, written deterministically to `path` (gzip-compressed when it ends .tar.gz or .tgz).

    Samples go to `PATH.partial`, renamed to `path` by `close()`, so a shard that exists is complete; leaving the
    context manager on an exception deletes the partial file instead. `count` and `bytes` say what was written.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        if not self.path.name.endswith((".tar",) + GZIP_SUFFIXES):
            raise ValueError(f"shard {self.path} must end .tar, .tar.gz or .tgz")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.count = 0
        self.bytes = 0
        self._file: BinaryIO = open(self.partial, "wb")
        self._gzip: Optional[gzip.GzipFile] = None
        stream: BinaryIO = self._file
        if self.path.name.endswith(GZIP_SUFFIXES):  # mtime=0 and no file name: the gzip header is constant
            self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, compresslevel=GZIP_LEVEL, mtime=0)
            stream = self._gzip
        self._tar = TarWriter(stream, encoder=False, compress=False, mtime=FIXED_MTIME)

    def write(self, key: str, files: Mapping[str, Union[bytes, str]]) -> None:
        """Add one sample: `files` maps extension (e.g. "jpg", "txt") to bytes or text (stored as UTF-8)."""
        check_key(key)
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        sample: dict[str, Union[str, bytes]] = {"__key__": key}
        for ext, value in files.items():
            if not EXT_OK.match(ext):
                raise ValueError(f"sample {key!r}: bad extension {ext!r} (lower-case letters, digits and '_')")
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if len(data) > MAX_MEMBER_BYTES:
                raise ValueError(f"sample {key!r}: {ext} is {len(data) / MIB:.0f} MiB, over the "
                                 f"{MAX_MEMBER_BYTES // MIB} MiB the loader reads")
            sample[ext] = data
        self.bytes += self._tar.write(sample)
        self.count += 1

    def close(self) -> None:
        """Finish the archive and move it into place."""
        if self._file.closed:
            return
        self._finish()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        """Stop writing and delete the partial file."""
        if not self._file.closed:
            self._finish()
        self.partial.unlink(missing_ok=True)

    def _finish(self) -> None:
        self._tar.close()
        if self._gzip is not None:
            self._gzip.close()
        self._file.close()

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()


def existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    """Shards named PREFIX-*.tar already in out_dir."""
    return sorted(out_dir.glob(f"{prefix}-*.tar")) if out_dir.is_dir() else []


class ShardSink:
    """Write samples into `out_dir/PREFIX-%06d.tar` (ShardFile each), at most `shard_size` samples per shard.

    Use as a context manager; `paths` lists the shards finished and `count` the samples. Refuses to write where
    PREFIX-* shards already exist unless overwrite=True (then they are deleted first), so a shard set is never a
    mix of two runs. An empty run writes no shard.
    """

    def __init__(self, out_dir: Union[str, Path], *, prefix: str = "shard", shard_size: int = 1000,
                 overwrite: bool = False) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        if not PREFIX_OK.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-'")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.shard_size = shard_size
        old = existing_shards(self.out_dir, prefix)
        if old and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {len(old)} {prefix}-*.tar shards; choose an empty directory or "
                "pass --overwrite"
            )
        for path in old:
            path.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.count = 0
        self._shard: Optional[ShardFile] = None

    def write(self, key: str, files: Mapping[str, Union[bytes, str]]) -> None:
        """Add one sample (see ShardFile.write)."""
        shard = self._shard
        if shard is not None and (shard.count >= self.shard_size or shard.bytes >= MAX_SHARD_BYTES):
            self.close()
        if self._shard is None:
            self._shard = ShardFile(self.out_dir / shard_file_name(self.prefix, len(self.paths)))
        self._shard.write(key, files)
        self.count += 1

    def close(self) -> None:
        """Finish the current shard."""
        if self._shard is not None:
            self._shard.close()
            self.paths.append(self._shard.path)
            self._shard = None

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._shard is not None:
            self._shard.discard()
            self._shard = None
        self.close()
