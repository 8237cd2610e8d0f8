"""Relocatable runs: the relative paths a recipe holds are read against where the run was recorded.

A recipe names local assets by the paths its author typed, often relative (``autoencoder.name_or_path:
data/digits-autoencoder-32``). A checkpoint records, beside its ``recipe.yaml``, the absolute path each relative
one meant when it was written (``meta.json``'s ``paths``: dotted recipe key -> absolute path), so a run opened from
any other working directory reads the same files. Only paths that existed locally at save time are recorded; a
relative value that did not (a hub id such as ``org/name``, a cache folder still to be made) stays as written.

When a recorded asset has moved, opening the run names the key, the path it looked for and the override that
points it elsewhere (``relocate={"autoencoder.name_or_path": NEW}``, on the command line ``--relocate KEY=NEW``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from flowmatch.errors import nearest

#: Recipe fields that hold local paths (or hub ids, URLs and shard patterns, which are left alone).
PATH_FIELDS = ("name_or_path", "shards", "val_shards", "cache", "init_from", "teacher")
_NOT_LOCAL = ("pipe:", "pkg:", "hf:")
_PATTERN = "{*?["


class RunAssetMissing(FileNotFoundError):
    """A run's recorded local asset is no longer where the run recorded it."""


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every path field under a recipe (sub)tree; list items and mapping entries by name."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = f"{prefix}{f.name}"
            if f.name in PATH_FIELDS and isinstance(value, str):
                yield key, value
            else:
                yield from _leaves(value, key + ".")
    elif isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, f"{prefix}{name}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{i}.")


def path_keys(recipe: Any) -> list[str]:
    """The dotted keys of every path field of a recipe (what ``relocate`` may name)."""
    return [key for key, _ in _leaves(recipe)]


def _local_relative(value: str) -> bool:
    return bool(value) and "://" not in value and not value.startswith(_NOT_LOCAL) and not os.path.isabs(value)


def _exists(path: str) -> bool:
    """Whether a path, or the folder of a shard pattern (``dir/train-{000..009}.tar``), exists."""
    cut = min((path.index(c) for c in _PATTERN if c in path), default=None)
    if cut is None:
        return os.path.exists(path)
    folder = os.path.dirname(path[:cut])
    return bool(folder) and os.path.isdir(folder)


def record_paths(recipe: Any, workdir: Optional[str | os.PathLike[str]] = None) -> dict[str, str]:
    """Dotted key -> absolute path of every relative local path of ``recipe`` that exists under ``workdir`` (the
    working directory by default): what a checkpoint records to be opened from elsewhere."""
    base = os.path.abspath(workdir or os.getcwd())
    out = {}
    for key, value in _leaves(recipe):
        if _local_relative(value):
            absolute = os.path.normpath(os.path.join(base, value))
            if _exists(absolute):
                out[key] = absolute
    return out


def _set(recipe: Any, key: str, value: str) -> None:
    *parents, last = key.split(".")
    node = recipe
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
    setattr(node, last, value)


def relocated(recipe: Any, recorded: Optional[Mapping[str, str]], relocate: Optional[Mapping[str, str]] = None
              ) -> tuple[Any, dict[str, tuple[str, str]]]:
    """``recipe`` with its recorded relative paths made absolute (``recorded``: a checkpoint's ``paths``) and the
    keys of ``relocate`` pointed at the paths it gives; returns it with the recorded assets that are gone (key ->
    (the value the recipe gives, the absolute path looked for)), which :func:`require` turns into an error for the
    keys a reader needs.

    Raises:
        ValueError: ``relocate`` names a key that holds no path.
    """
    keys = path_keys(recipe)
    for key in relocate or {}:
        if key not in keys:
            near = nearest(key, keys)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ValueError(f"relocate {key!r}: not a path of the recipe{hint}; paths: {', '.join(keys)}")
    written = dict(_leaves(recipe))
    recipe = copy.deepcopy(recipe)
    missing = {}
    for key, absolute in (recorded or {}).items():
        if key in (relocate or {}) or key not in keys:
            continue
        _set(recipe, key, absolute)
        if not _exists(absolute):
            missing[key] = (written[key], absolute)
    for key, path in (relocate or {}).items():
        _set(recipe, key, os.path.abspath(path) if _local_relative(path) else path)
    return recipe, missing


def require(missing: Mapping[str, tuple[str, str]], sections: tuple[str, ...], where: str) -> None:
    """RunAssetMissing naming each recorded asset under ``sections`` that is gone, the path looked for and the
    override that points it elsewhere."""
    gone = {k: v for k, v in missing.items() if k.split(".")[0] in sections}
    if not gone:
        return
    lines = "; ".join(f"{k}={value!r} was recorded as {path}, which does not exist"
                      for k, (value, path) in gone.items())
    first = next(iter(gone))
    raise RunAssetMissing(f"{where}: {lines}. The run's assets moved: put them back, or point the run at their new "
                          f"place with --relocate {first}=NEW_PATH (Python: relocate={{{first!r}: NEW_PATH}})")
