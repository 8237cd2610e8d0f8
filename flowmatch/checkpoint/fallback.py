"""Which checkpoint to read: the newest one that verifies, with the damaged ones skipped, said and quarantined.

Readers of a run directory (``Pipeline.from_checkpoint``, ``flowmatch sample``, ``flowmatch eval``) take its newest
checkpoint whose listed files all have their size and whose files they read have their hash, and warn about each
newer one they skipped; they change nothing in the run directory. Resuming a run (:func:`select_for_resume`)
verifies every file, all ranks together, and renames each damaged checkpoint ``<step>.damaged`` (quarantine: it
is kept for inspection, never read, never pruned) so that the run's own saves and pruning never mistake it for a
good one. A checkpoint named explicitly is used only if it verifies; otherwise the error names the file and what
is wrong with it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from flowmatch.checkpoint.layout import (
    CHECKPOINTS_DIR,
    DAMAGE_NOTE,
    DAMAGED_SUFFIX,
    META_FILE,
    CheckpointError,
    checkpoints_root,
    is_legacy,
    looks_complete,
    names_a_checkpoint,
    step_dirs,
)
from flowmatch.checkpoint.manifest import Damage, verify_checkpoint
from flowmatch.checkpoint.save import EngineLike

log = logging.getLogger(__name__)

Reads = Callable[[Path], Iterable[str]]
"""The files (relative paths) a reader will read from a candidate checkpoint: these are hashed."""


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of a run whose save finished (``RUN_DIR/checkpoints/<step>``), unverified; or None."""
    found = [d for _, d in step_dirs(checkpoints_root(run_dir)) if looks_complete(d)]
    return found[-1] if found else None


def _listing(damage: Sequence[Damage]) -> str:
    return "; ".join(str(d) for d in damage)


def damaged_message(ckpt: Path, damage: Sequence[Damage]) -> str:
    """One paragraph: which checkpoint, which file, what is wrong, what to use instead."""
    run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else None
    hint = (f" Point at the run directory {run} instead to use its newest intact checkpoint "
            f"(`flowmatch check {run}` lists them)." if run is not None else "")
    return f"checkpoint {ckpt} is damaged and cannot be used: {_listing(damage)}.{hint}"


def _warn_if_legacy(ckpt: Path) -> None:
    if is_legacy(ckpt):
        log.warning("checkpoint %s was written before checkpoints carried a manifest: its files were checked for "
                    "completeness only, their content cannot be verified", ckpt)


def _damage(ckpt: Path, reads: Reads | None) -> list[Damage]:
    """What is wrong with ``ckpt`` for a reader: meta.json first (choosing the files to read may parse it), then
    the files ``reads`` names, hashed."""
    return verify_checkpoint(ckpt, hashed=(META_FILE,)) or verify_checkpoint(ckpt, hashed=reads(ckpt) if reads else ())


def resolve_checkpoint(path: str | os.PathLike[str], *, reads: Reads | None = None) -> Path:
    """A verified checkpoint directory from ``path``: a checkpoint itself, or a run directory (its newest intact one).

    Args:
        path: ``RUN_DIR``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/<step>``.
        reads: the files the caller will read from the checkpoint: they are hashed as well (every listed file
            is always checked for presence and size).

    Raises:
        FileNotFoundError: ``path`` is neither, or the run has no checkpoint.
        CheckpointError: the named checkpoint is damaged, or every checkpoint of the run is.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: expected a run directory (RUN_DIR) or a checkpoint "
                                f"(RUN_DIR/{CHECKPOINTS_DIR}/<step>)")
    if names_a_checkpoint(p):
        damage = _damage(p, reads)
        if damage:
            raise CheckpointError(damaged_message(p, damage))
        _warn_if_legacy(p)
        return p
    skipped: list[tuple[Path, list[Damage]]] = []
    for _, ckpt in reversed(step_dirs(checkpoints_root(p))):
        damage = _damage(ckpt, reads)
        if damage:
            skipped.append((ckpt, damage))
            continue
        for bad, what in skipped:
            log.warning("skipped damaged checkpoint %s: %s", bad, _listing(what))
        _warn_if_legacy(ckpt)
        return ckpt
    if skipped:
        raise CheckpointError(f"no intact checkpoint under {p}: " + " ".join(
            f"{bad.name}: {_listing(what)}." for bad, what in skipped) + f" `flowmatch check {p}` lists them.")
    raise FileNotFoundError(f"no checkpoint under {p}: train first or point at RUN_DIR/{CHECKPOINTS_DIR}/<step>")


def quarantine(ckpt: Path, damage: Sequence[Damage]) -> Path:
    """Rename a damaged checkpoint ``<step>.damaged`` (``-2``, ... if taken) with a note of what is wrong; never
    delete it. Returns the new path."""
    target, n = ckpt.with_name(ckpt.name + DAMAGED_SUFFIX), 2
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}{DAMAGED_SUFFIX}-{n}"), n + 1
    os.rename(ckpt, target)
    note = "\n".join(str(d) for d in damage)
    try:
        (target / DAMAGE_NOTE).write_text(f"quarantined {time.strftime('%Y-%m-%d %H:%M:%S')}:\n{note}\n")
    except OSError:  # the rename is what matters; the note is a courtesy
        pass
    return target


def quarantined(root: Path) -> list[Path]:
    """The quarantined checkpoints of a ``checkpoints`` folder."""
    return sorted(d for d in root.glob(f"*{DAMAGED_SUFFIX}*") if d.is_dir()) if root.is_dir() else []


def verify_together(engine: EngineLike, ckpt: Path) -> list[Damage]:
    """Collective: every file of ``ckpt`` checked once, the hashing shared by the ranks; the same list on all."""
    mine = verify_checkpoint(ckpt, rank=engine.rank, world_size=engine.world_size)
    return sorted({d for part in engine.all_gather_object(mine) for d in part}, key=lambda d: d.file)


def select_for_resume(engine: EngineLike, run_dir: str | os.PathLike[str]) -> Path | None:
    """Collective: the newest checkpoint of ``run_dir`` that verifies completely, the same on every rank.

    Rank 0 lists the candidates; all ranks verify each in turn (:func:`verify_together`); rank 0 quarantines and
    reports each damaged one. None when the run has no checkpoint yet.

    Raises:
        CheckpointError: the run has checkpoints, but all of them are damaged (resuming would silently start over).
    """
    root = checkpoints_root(run_dir)
    names = engine.broadcast_object([d.name for _, d in reversed(step_dirs(root))] if engine.is_main else None)
    for name in names:
        ckpt = root / name
        damage = verify_together(engine, ckpt)
        if not damage:
            if engine.is_main:
                _warn_if_legacy(ckpt)
            return ckpt
        if engine.is_main:
            moved = quarantine(ckpt, damage)
            log.warning("skipping damaged checkpoint %s: %s. Moved it to %s", ckpt, _listing(damage), moved)
        engine.barrier()
    bad = engine.broadcast_object([d.name for d in quarantined(root)] if engine.is_main else None)
    if bad:
        raise CheckpointError(f"no intact checkpoint to resume from in {root}: {', '.join(bad)} are damaged and set "
                              f"aside (`flowmatch check {Path(run_dir)}` says what is wrong). To start this run over "
                              f"from step 0, move {root} away or use another run_dir.")
    return None
