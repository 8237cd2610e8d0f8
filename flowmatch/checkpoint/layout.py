"""The names and facts of a checkpoint directory: its files, ``meta.json``, which directories are checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from flowmatch.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RECIPE_FILE = "recipe.yaml"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
STATE_DIR = "state"
# What a resume can do without: the optimizer state as whole tensors by name (flowmatch.engine.elastic), needed only
# to resume on another layout. When it alone is damaged, a resume goes on and resets the optimizer if it needs it.
SPARE_PREFIX = f"{STATE_DIR}/optim-full"
# 3: manifest.json lists every file with its size and SHA-256, and the engine state holds no pickles.
# 2: the distributed layout left meta.json; state/engine.json records it.
FORMAT_VERSION = 3
# Directories of saves in progress (and of deletions) start with this; readers ignore them, the next save removes them.
TMP_PREFIX = ".tmp-"
# A damaged checkpoint <step> is renamed <step>.damaged (then .damaged-2, ...): kept, never read, never pruned.
DAMAGED_SUFFIX = ".damaged"
DAMAGE_NOTE = "DAMAGED.txt"


class CheckpointError(RuntimeError, UsageError):
    """A checkpoint cannot be written or used; the message names the directory, the file and what to do."""


@dataclass
class CheckpointMeta:
    """Contents of ``meta.json``."""

    step: int
    """Optimizer steps completed when the checkpoint was written."""
    ema: bool
    """Whether ``ema.safetensors`` is present."""
    created: float
    """Unix time at which it was written."""
    format_version: int = FORMAT_VERSION
    """Layout version of the checkpoint directory."""
    flowmatch_version: str = ""
    """Package version that wrote it."""
    ema_default: bool | None = None
    """Whether :func:`load_weights` gives the EMA weights by default: validation found them at least as good as
    the raw ones (None: not measured, then the EMA when present)."""
    init_from: dict | None = None
    """Where the run's starting weights came from (:class:`flowmatch.init_from.InitRecord`: source, kind, path,
    SHA-256); the base weights of a LoRA run, whose weights files hold only the adapters. None = random init."""
    paths: dict | None = None
    """Recipe key -> the absolute path each relative local path of ``recipe.yaml`` meant when it was written
    (:mod:`flowmatch.run.paths`), so the run opens from any working directory. None = none recorded."""


def parse_meta(text: str) -> CheckpointMeta:
    """A :class:`CheckpointMeta` from the text of ``meta.json`` (any format version)."""
    saved = json.loads(text)
    # Format 1 also recorded the distributed layout here; state/engine.json records it now.
    return CheckpointMeta(**{f.name: saved[f.name] for f in fields(CheckpointMeta) if f.name in saved})


def checkpoints_root(path: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/checkpoints`` from a run directory (or from that folder itself)."""
    p = Path(path)
    return p if p.name == CHECKPOINTS_DIR else p / CHECKPOINTS_DIR


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every directory named by a step in ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(d.name), d) for d in root.iterdir() if d.name.isdigit() and d.is_dir())


def is_legacy(ckpt: Path) -> bool:
    """Whether ``ckpt`` was written before checkpoints carried a manifest (format 2 or 1: ``meta.json`` only)."""
    if (ckpt / MANIFEST_FILE).exists():
        return False
    try:
        return parse_meta((ckpt / META_FILE).read_text()).format_version < FORMAT_VERSION
    except (OSError, ValueError, TypeError):
        return False


def names_a_checkpoint(p: Path) -> bool:
    """Whether ``p`` is (or is meant as) one checkpoint rather than a run directory."""
    return ((p / MANIFEST_FILE).is_file() or (p / META_FILE).is_file()
            or (p.name.isdigit() and p.parent.name == CHECKPOINTS_DIR))


def looks_complete(ckpt: Path) -> bool:
    """Whether ``ckpt`` has what marks a finished save (its manifest, or a legacy ``meta.json``), unverified."""
    return (ckpt / MANIFEST_FILE).is_file() or is_legacy(ckpt)


def weights_file(ckpt: Path, ema: bool | None) -> str:
    """The weights file to read from ``ckpt``: EMA when ``ema`` is True; with None the checkpoint's default, the
    weights validation found better (:attr:`CheckpointMeta.ema_default`), else the EMA when present.

    Raises:
        FileNotFoundError: ``ema`` is True and the run kept no EMA.
    """
    has_ema = (ckpt / EMA_FILE).is_file()
    if ema and not has_ema:
        raise FileNotFoundError(f"{ckpt} has no {EMA_FILE}: that run kept no EMA; load the raw weights (ema=False)")
    if ema is None:
        ema = has_ema and parse_meta((ckpt / META_FILE).read_text()).ema_default is not False
    return EMA_FILE if ema else MODEL_FILE


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (e.g. ``3.2 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
