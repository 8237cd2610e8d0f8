"""The integrity of a run's EMA snapshots (``RUN_DIR/ema/snapshots/``): listed, verified and quarantined like
checkpoints.

``RUN_DIR/ema/snapshots/manifest.json`` lists each snapshot file with its size and SHA-256, added right after the
file is renamed into place (:func:`record_snapshot`, rank 0; the manifest itself is replaced atomically). A
snapshot the manifest does not list (written before manifests, or by a save killed between the rename and the
listing) is checked structurally: its safetensors header against its length. A damaged snapshot is renamed
``<step>.safetensors.damaged`` with a note beside it (quarantine: kept for inspection, never read), and whoever
set it aside says so: resume and ``flowmatch ema`` go on without it, ``flowmatch check`` lists it.

What the snapshots hold and how they combine is :mod:`flowmatch.posthoc`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path

from flowmatch.checkpoint.layout import DAMAGED_SUFFIX
from flowmatch.checkpoint.manifest import HASH, safetensors_problem, sha256_file

log = logging.getLogger(__name__)

EMA_DIR = "ema"
SNAPSHOTS_DIR = "snapshots"
SUFFIX = ".safetensors"
SNAPSHOT_MANIFEST = "manifest.json"
NOTE_SUFFIX = ".txt"


def snapshots_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/ema/snapshots``."""
    return Path(run_dir) / EMA_DIR / SNAPSHOTS_DIR


def snapshot_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The snapshot files of a run (``<step>.safetensors``), oldest first; nothing is read."""
    folder = snapshots_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.endswith(SUFFIX) and p.name[:-len(SUFFIX)].isdigit()]
    return sorted(found, key=lambda p: int(p.name[:-len(SUFFIX)]))


def _listed(folder: Path) -> dict[str, dict]:
    try:
        body = json.loads((folder / SNAPSHOT_MANIFEST).read_text())
        return dict(body["files"]) if body.get("hash") == HASH else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or unreadable: checked by structure
        return {}


def record_snapshot(path: Path) -> None:
    """Add the snapshot just written at ``path`` to its folder's manifest (rank 0), dropping entries of files that
    are gone; the manifest is replaced atomically."""
    folder = path.parent
    files = {name: entry for name, entry in _listed(folder).items() if (folder / name).is_file()}
    files[path.name] = {"bytes": path.stat().st_size, HASH: sha256_file(path)}
    tmp = folder / f".tmp-{SNAPSHOT_MANIFEST}"
    tmp.write_text(json.dumps({"hash": HASH, "files": dict(sorted(files.items()))}, indent=1))
    os.replace(tmp, folder / SNAPSHOT_MANIFEST)


def snapshot_problem(path: Path, *, hashed: bool) -> str | None:
    """What is wrong with one snapshot file, or None: its size (and with ``hashed`` its SHA-256) against the
    manifest, and its header against its length."""
    entry = _listed(path.parent).get(path.name)
    try:
        size = path.stat().st_size
        if entry is not None and size != int(entry["bytes"]):
            return f"{'truncated' if size < int(entry['bytes']) else 'longer than written'}: {size:,} bytes, " \
                   f"the manifest says {int(entry['bytes']):,}"
        problem = safetensors_problem(path)
        if problem is None and hashed and entry is not None and sha256_file(path) != entry[HASH]:
            problem = "content differs from the manifest (SHA-256 mismatch: the bytes changed after they were written)"
        return problem
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable ({err})"


def is_listed(path: Path) -> bool:
    """Whether the snapshot manifest lists ``path`` (else only its structure can be checked)."""
    return path.name in _listed(path.parent)


def quarantine_snapshot(path: Path, problem: str) -> Path:
    """Rename a damaged snapshot ``<name>.damaged`` (``-2``, ... if taken) with a note of what is wrong; never
    delete it. Returns the new path."""
    target, n = path.with_name(path.name + DAMAGED_SUFFIX), 2
    while target.exists():
        target, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}"), n + 1
    os.rename(path, target)
    try:
        target.with_name(target.name + NOTE_SUFFIX).write_text(f"{path.name}: {problem}\n")
    except OSError:  # the rename is what matters; the note is a courtesy
        pass
    return target


def set_aside_damaged(run_dir: str | os.PathLike[str], *, hashed: bool | Collection[int] = True) -> list[Path]:
    """Quarantine every damaged snapshot of a run (rank 0 only), each named in a warning; returns where they went.

    ``hashed``: True hashes every snapshot, a collection of steps hashes those (the ones about to be read), the
    others get the size and header checks."""
    moved = []
    for path in snapshot_files(run_dir):
        step = int(path.name[:-len(SUFFIX)])
        problem = snapshot_problem(path, hashed=hashed is True or (hashed is not False and step in hashed))
        if problem is not None:
            moved.append(quarantine_snapshot(path, problem))
            log.warning("EMA snapshot %s is damaged (%s): moved it to %s and going on without it", path, problem,
                        moved[-1])
    return moved


def quarantined_snapshots(run_dir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """The quarantined snapshots of a run with the note left at quarantine."""
    folder = snapshots_dir(run_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob(f"*{SUFFIX}{DAMAGED_SUFFIX}*")):
        if path.name.endswith(NOTE_SUFFIX):
            continue
        note = path.with_name(path.name + NOTE_SUFFIX)
        out.append((path, note.read_text().strip().split(": ", 1)[-1] if note.is_file() else ""))
    return out
