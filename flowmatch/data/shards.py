"""Which shards a split reads: pattern expansion, the held-out split, and building missing shards.

A pattern is a directory (its .tar files, plain or gzip/bz2/xz compressed), a glob, a brace pattern, an
http(s)/gs/hf URL or a `pipe:` command that writes a tar to stdout (how object stores are read:
`pipe:aws s3 cp s3://b/x.tar -`); '::' joins several. Shards whose file name starts with `val-` form the
held-out split and are never trained on (flowmatch.data.shardformat).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import braceexpand

from flowmatch.data.config import DataConfig
from flowmatch.data.shardformat import SHARD_SUFFIXES, is_val_name
from flowmatch.data.trust import UntrustedCommand, check_commands
from flowmatch.tasks import available_tasks, get_task

log = logging.getLogger("flowmatch.data")

SPLITS = ("train", "val")
GLOB_CHARS = "*?["
# Hash range of the key hash that decides the holdout (first 8 hex digits of sha1 = 32 bits).
HASH_RANGE = 2**32


@dataclass(frozen=True)
class ShardSplit:
    """The shards a split reads and which of their keys it keeps.

    holdout: "" keeps every key, "exclude" drops the held-out keys (training), "only" keeps just them (val).
    """

    urls: tuple[str, ...]
    holdout: str = ""
    holdout_fraction: float = 0.0
    weight: float = 1.0
    """Share of a mixture's samples (data.sources)."""
    caption_key: str = ""
    """Where captions are (see DataConfig.caption_key)."""
    name: str = ""

    def keeps(self, key: str) -> bool:
        """Whether this split uses sample `key`."""
        if not self.holdout:
            return True
        return is_held_out(key, self.holdout_fraction) == (self.holdout == "only")


def is_held_out(key: str, fraction: float) -> bool:
    """Stable across runs, machines and shard layouts: a function of the key alone."""
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return digest < fraction * HASH_RANGE


def is_remote(url: str) -> bool:
    """Whether ``url`` is a URL or a pipe: command (opened by flowmatch.data.opener), which cannot be listed or
    checked here."""
    return url.startswith("pipe:") or len(urlparse(url).scheme) > 1


def expand_shards(pattern: str) -> list[str]:
    """Expand a shards pattern into shard URLs/paths in a stable order; local names that match nothing are dropped."""
    urls: list[str] = []
    for part in filter(None, (p.strip() for p in pattern.split("::"))):
        if is_remote(part):
            urls.extend(braceexpand.braceexpand(part))
            continue
        for name in braceexpand.braceexpand(os.path.expanduser(part)):
            if os.path.isdir(name):
                urls.extend(sorted(str(p) for p in Path(name).iterdir() if p.name.endswith(SHARD_SUFFIXES)))
            elif any(c in name for c in GLOB_CHARS):
                urls.extend(sorted(p for p in glob.glob(name) if os.path.isfile(p)))
            elif os.path.isfile(name):
                urls.append(name)
    return list(dict.fromkeys(urls))


def shard_name(url: str) -> str:
    """The file name of a shard: for a pipe: command, the last word naming a .tar file."""
    if url.startswith("pipe:"):
        words = [w for w in url[5:].split() if w.endswith(SHARD_SUFFIXES)]
        return os.path.basename(words[-1]) if words else ""
    return os.path.basename(urlparse(url).path if is_remote(url) else url)


def is_val_shard(url: str) -> bool:
    """Shards named val-* hold out data (task builders write train-* and val-*)."""
    return is_val_name(shard_name(url))


def resolve_split(cfg: DataConfig, split: str) -> ShardSplit:
    """The shards of `split` ("train" or "val") and the key filter the holdout needs.

    Raises FileNotFoundError naming the pattern when nothing matches (see `ensure_shards`), and ValueError when
    the val split is asked for but the recipe sets none aside.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_commands(cfg)
    if cfg.sources:  # the shards of every source; each source's key filter is in resolve_sources
        return ShardSplit(tuple(u for part in resolve_sources(cfg, split) for u in part.urls))
    listed = expand_shards(cfg.read_from)
    explicit_val = expand_shards(cfg.val_shards) if cfg.val_shards else []
    if cfg.val_shards and not explicit_val:
        raise FileNotFoundError(f"data.val_shards={cfg.val_shards!r} matches no shards")
    val = explicit_val or [u for u in listed if is_val_shard(u)]
    train = [u for u in listed if u not in set(val) and not is_val_shard(u)]
    if split == "train":
        if not train:
            raise FileNotFoundError(missing_message(cfg.read_from))
        if not val and cfg.holdout_fraction > 0:
            return ShardSplit(tuple(train), "exclude", cfg.holdout_fraction)
        return ShardSplit(tuple(train))
    if val:
        return ShardSplit(tuple(val))
    if cfg.holdout_fraction > 0:
        if not train:
            raise FileNotFoundError(missing_message(cfg.read_from))
        return ShardSplit(tuple(train), "only", cfg.holdout_fraction)
    raise ValueError(
        f"no held-out data for split 'val': data.shards={cfg.read_from!r} has no val-* shards; set data.val_shards "
        "to held-out shards or data.holdout_fraction (e.g. 0.05) to hold out keys by hash"
    )


def source_name(cfg: DataConfig, i: int) -> str:
    """The name of data source `i` in logs."""
    return cfg.sources[i].name or f"source{i}"


def source_config(cfg: DataConfig, i: int) -> DataConfig:
    """`cfg` reading data source `i` alone."""
    src = cfg.sources[i]
    return replace(cfg, shards=src.shards, val_shards=src.val_shards, caption_key=src.caption_key, sources=[])


def resolve_sources(cfg: DataConfig, split: str) -> tuple[ShardSplit, ...]:
    """The split of each data source (one for data.shards). For "val", sources without held-out data are left out;
    ValueError when none has any."""
    if not cfg.sources:
        return (replace(resolve_split(cfg, split), caption_key=cfg.caption_key),)
    check_commands(cfg)  # source_config's copies do not carry DataConfig.stored_in
    parts = []
    for i, src in enumerate(cfg.sources):
        try:
            part = resolve_split(source_config(cfg, i), split)
        except ValueError:
            if split == "train":
                raise
            continue
        parts.append(replace(part, weight=src.weight, caption_key=src.caption_key, name=source_name(cfg, i)))
    if not parts:
        raise ValueError("no data source has held-out data: give data.sources[].val_shards, val-* shards, or set "
                         "data.holdout_fraction")
    return tuple(parts)


def val_source_names(cfg: DataConfig) -> list[str]:
    """The data sources with held-out data, by name, when the recipe mixes several ([] otherwise)."""
    if len(cfg.sources) < 2:
        return []
    try:
        return [part.name for part in resolve_sources(cfg, "val")]
    except (FileNotFoundError, ValueError):
        return []


def has_val_split(cfg: DataConfig) -> bool:
    """Whether `cfg` names held-out data (val shards, val-* shards among shards, or a holdout fraction).

    Decided from the configuration and the shard names alone, so every rank gets the same answer.
    """
    try:
        resolve_sources(cfg, "val")
    except UntrustedCommand:
        raise  # a refusal, not an absence of held-out data
    except (FileNotFoundError, ValueError):
        return False
    return True


def missing_message(pattern: str) -> str:
    """What to do when a shards pattern matches nothing."""
    return (
        f"data.shards={pattern!r} matches no shards (.tar/.tar.gz). Make shards with "
        f"`flowmatch-data folder IMAGES_DIR {pattern}` (images with same-name .txt captions) "
        f"or `flowmatch-data jsonl ROWS.jsonl {pattern}`; or set data.prepare to a task that builds its shards "
        f"automatically (installed tasks: {', '.join(available_tasks()) or 'none'})."
    )


def ensure_shards(cfg: DataConfig) -> list[str]:
    """Return the training shards, building them first when none exist and `cfg.prepare` names a builder.

    Building writes into a temporary directory renamed into place, so processes racing to build never see a
    half-written set; still, call it on rank 0 and barrier before the other ranks build their loaders.
    """
    if cfg.sources:
        return [u for part in resolve_sources(cfg, "train") for u in part.urls]
    raw = dataclasses.replace(cfg, cache="")  # the shards themselves, whether or not a cache of them exists
    urls = expand_shards(cfg.shards)
    if any(not is_val_shard(u) for u in urls):
        return list(resolve_split(raw, "train").urls)
    if not cfg.prepare:
        raise FileNotFoundError(missing_message(cfg.shards))
    target = Path(os.path.expanduser(cfg.shards))
    if is_remote(cfg.shards) or "::" in cfg.shards or any(c in cfg.shards for c in GLOB_CHARS + "{"):
        raise ValueError(
            f"data.prepare={cfg.prepare!r} builds into a directory, but data.shards={cfg.shards!r} is a pattern; "
            "set data.shards to a directory such as data/shards"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileNotFoundError(
            f"data.shards={cfg.shards!r} exists but holds no training shards, so data.prepare={cfg.prepare!r} will "
            "not write into it; empty it or point data.shards at a new directory"
        )
    builder = get_task(cfg.prepare, "data.prepare").build
    if builder is None:
        raise ValueError(f"data.prepare={cfg.prepare!r}: that task builds no shards; set data.prepare='' and make "
                         "the shards with flowmatch-data")
    log.warning("data: no shards at %s; building them with the %r task's builder (data.prepare)", target, cfg.prepare)
    building = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        builder(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    try:
        os.replace(building, target)  # atomic; replaces an empty directory, fails on one another process filled
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
        if not expand_shards(cfg.shards):
            raise
    log.warning("data: built %d shards in %s", len(expand_shards(cfg.shards)), target)
    return list(resolve_split(raw, "train").urls)
