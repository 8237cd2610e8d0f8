"""The manifest of a checkpoint: every file with its size and SHA-256, written last; verification against it.

``manifest.json`` maps each file's path (relative to the checkpoint) to ``{"bytes", "sha256", "rank"}`` (the rank
that wrote it). A checkpoint is complete only when its manifest is present and every file it lists exists with
that size and hash. Each rank hashes the files it wrote right after writing them (from the page cache), so the
cost is spread over the ranks; verification splits the files over the ranks the same way (:func:`share`).

Why SHA-256 of every byte: a truncated file is caught by its size alone, but a bit flip or a partial overwrite
keeps the size, and only a hash of the content sees it. SHA-256 is in the standard library (no dependency), its
digest leaves no doubt, and CPUs since about 2017 hash it in hardware (SHA-NI, ARMv8 crypto): 0.6-1.1 GB/s per
core measured on this project's shared, overloaded 2-core CI machine, against 1.8 GB/s for zlib's CRC-32 there.
hashlib releases the GIL, so the files of one rank hash on parallel threads. A non-cryptographic hash (xxHash)
would be faster per core but is a dependency, and the wall time is set by the largest file anyway (the README's
checkpoint section gives the figures at 2B parameters: seconds per save, beside tens of seconds of writing).
Checkpoints written before manifests existed (format 2) are checked structurally (every safetensors header
against its file's length, every JSON parses) and said to be unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowmatch.checkpoint.layout import MANIFEST_FILE, META_FILE, is_legacy, parse_meta

HASH = "sha256"
_MANIFEST_FORMAT = 1
_CHUNK = 16 << 20  # bytes read per hash update: large enough that hashlib runs without the GIL
_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class Damage:
    """What is wrong with one file of a checkpoint."""

    file: str
    """Path relative to the checkpoint directory."""
    problem: str
    """What is wrong, in words (``missing``, ``truncated: ...``, ``content differs ...``)."""

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return list(pool.map(sha256_file, paths))


def describe_files(root: Path, paths: Iterable[Path], rank: int) -> dict[str, dict[str, Any]]:
    """Manifest entries (size, SHA-256, writer ``rank``) of ``paths``, keyed by their path relative to ``root``."""
    paths = list(paths)
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, HASH: digest, "rank": rank}
            for p, digest in zip(paths, _hash_all(paths))}


def write_manifest(ckpt: Path, step: int, files: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``manifest.json`` listing ``files`` (see :func:`describe_files`); the last file of a save."""
    path = ckpt / MANIFEST_FILE
    body = {"format": _MANIFEST_FORMAT, "step": step, "hash": HASH, "files": dict(sorted(files.items()))}
    path.write_text(json.dumps(body, indent=1))
    return path


def read_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """The file entries of ``ckpt``'s manifest.

    Raises:
        FileNotFoundError: there is none. ValueError: it cannot be read as a manifest.
    """
    body = json.loads((ckpt / MANIFEST_FILE).read_text())
    if not isinstance(body, dict) or body.get("hash") != HASH or not isinstance(body.get("files"), dict):
        found = body.get("format") if isinstance(body, dict) else "?"
        raise ValueError(f"not a manifest of this project (format {found})")
    return body["files"]


def listed_bytes(ckpt: Path) -> int | None:
    """Total size of the files ``ckpt``'s manifest lists (None without a readable manifest)."""
    try:
        return sum(int(entry["bytes"]) for entry in read_manifest(ckpt).values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def share(files: Mapping[str, Mapping[str, Any]], rank: int, world_size: int) -> set[str]:
    """The files rank ``rank`` of ``world_size`` hashes: the largest first, each to the least loaded rank."""
    load = [0] * world_size
    mine = set()
    for name, entry in sorted(files.items(), key=lambda item: (-int(item[1]["bytes"]), item[0])):
        r = load.index(min(load))
        load[r] += int(entry["bytes"])
        if r == rank:
            mine.add(name)
    return mine


def verify_checkpoint(ckpt: Path, *, hashed: Iterable[str] | None = None, rank: int = 0,
                      world_size: int = 1) -> list[Damage]:
    """What is wrong with ``ckpt`` (empty when nothing is).

    Every listed file must exist with its listed size; the content of the files in ``hashed`` (None: all of
    them) is hashed too, those of this rank's :func:`share` only, so that ``world_size`` ranks calling this
    together check everything once. A checkpoint of format 2 (no manifest) gets :func:`legacy_damage` instead.
    """
    if not (ckpt / MANIFEST_FILE).is_file():
        if is_legacy(ckpt):
            return legacy_damage(ckpt) if rank == 0 else []
        what = "no such directory" if not ckpt.is_dir() else (
            "missing: the save or the copy of this checkpoint did not finish")
        return [Damage(MANIFEST_FILE, what)]
    try:
        files = read_manifest(ckpt)
    except (OSError, ValueError) as err:
        return [Damage(MANIFEST_FILE, f"unreadable ({err})")]
    damage = []
    for name, entry in sorted(files.items()):
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            damage.append(Damage(name, "missing"))
            continue
        expected = int(entry["bytes"])
        if size != expected:
            what = "truncated" if size < expected else "longer than written"
            damage.append(Damage(name, f"{what}: {size:,} bytes, the manifest says {expected:,}"))
    wanted = set(files) if hashed is None else set(hashed) & set(files)
    todo = sorted((wanted & share(files, rank, world_size)) - {d.file for d in damage})
    for name, digest in zip(todo, _hash_all([ckpt / n for n in todo])):
        if digest != files[name][HASH]:
            damage.append(Damage(name, "content differs from the manifest (SHA-256 mismatch: the bytes changed "
                                       "after they were written)"))
        elif problem := structure_problem(ckpt / name):  # a manifest rewritten to match planted bytes
            damage.append(Damage(name, problem))
    return sorted(damage, key=lambda d: d.file)


def safetensors_problem(path: Path) -> str | None:
    """What is structurally wrong with a safetensors file (its header against its length), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even a header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"truncated: {size:,} bytes, its header alone takes {8 + n:,}"
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            return f"unreadable header ({err})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{size:,} bytes, its header describes {8 + n + end:,}"
    return None


def structure_problem(path: Path) -> str | None:
    """What is structurally wrong with a checkpoint's JSON or safetensors file (None: nothing, or another kind)."""
    try:
        if path.suffix == ".safetensors":
            return safetensors_problem(path)
        if path.suffix == ".json":
            json.loads(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # a header of the wrong shape too
        return f"{'not JSON' if path.suffix == '.json' else 'unreadable'} ({err})"
    return None


def legacy_damage(ckpt: Path) -> list[Damage]:
    """Structural checks of a checkpoint without a manifest: meta.json and every JSON file parse, every
    safetensors file is as long as its header says. DeepSpeed's pickled files are never read, so not checked."""
    damage = []
    try:
        parse_meta((ckpt / META_FILE).read_text())
    except (OSError, ValueError, TypeError) as err:
        damage.append(Damage(META_FILE, f"unreadable ({err})"))
    for path in sorted(ckpt.rglob("*")):
        problem = structure_problem(path) if path.name != META_FILE else None
        if problem:
            damage.append(Damage(path.relative_to(ckpt).as_posix(), problem))
    return damage
