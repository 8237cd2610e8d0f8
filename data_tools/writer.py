"""Writing shards: safe sample keys and a shard writer that numbers, bounds and finishes shards.

Shards are plain tar files written by webdataset's ShardWriter, named `PREFIX-000000.tar`, with a fixed member
mtime so the same input gives byte-identical shards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

from webdataset import ShardWriter

# Member modification time written into every shard (2020-01-01 UTC): fixed so rebuilding is reproducible.
FIXED_MTIME = 1577836800
KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_key(name: str) -> str:
    """A sample key from any name: runs of characters other than letters, digits, '_' and '-' become '_'.

    Dots must go (the WebDataset convention splits the extension at the first dot of the file name), and so must
    '/' and '..' (a key is a member name inside the tar).
    """
    key = UNSAFE_CHARS.sub("_", name).strip("_")
    return key or "sample"


def check_key(key: str) -> None:
    """ValueError for a key that would make an unsafe or ambiguous member name."""
    if not KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (see data_tools.writer.safe_key)")


def existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    """Shards named PREFIX-*.tar already in out_dir."""
    return sorted(out_dir.glob(f"{prefix}-*.tar")) if out_dir.is_dir() else []


class ShardSink:
    """Write samples into `out_dir/PREFIX-%06d.tar`, at most `shard_size` samples per shard.

    Use as a context manager; `paths` lists the shards written and `count` the samples. Refuses to write where
    PREFIX-* shards already exist unless overwrite=True (then they are deleted first), so a shard set is never a
    mix of two runs.
    """

    def __init__(self, out_dir: Union[str, Path], *, prefix: str = "shard", shard_size: int = 1000,
                 overwrite: bool = False) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        check_key(prefix)
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
        self._writer: Optional[ShardWriter] = None

    def write(self, key: str, files: Mapping[str, Union[bytes, str]]) -> None:
        """Add one sample: files maps extension (e.g. "jpg", "txt") to bytes or text."""
        check_key(key)
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        sample: dict[str, Union[str, bytes]] = {"__key__": key}
        for ext, value in files.items():
            if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", ext):
                raise ValueError(f"sample {key!r}: bad extension {ext!r} (lower-case letters and digits)")
            sample[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if self._writer is None:  # opened lazily: an empty run writes no empty shard
            pattern = os.path.join(str(self.out_dir), f"{self.prefix}-%06d.tar")
            self._writer = ShardWriter(pattern, maxcount=self.shard_size, verbose=0, encoder=False,
                                       mtime=FIXED_MTIME, post=lambda name: self.paths.append(Path(name)))
        self._writer.write(sample)
        self.count += 1

    def close(self) -> None:
        """Finish the last shard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
