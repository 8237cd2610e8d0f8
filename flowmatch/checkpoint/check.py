"""``flowmatch check RUN``: every checkpoint of a run with its state, verified file by file.

The counterpart for runs of ``flowmatch-data verify``: it hashes every file of every checkpoint against its
manifest and changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from flowmatch.checkpoint.fallback import quarantined
from flowmatch.checkpoint.layout import (
    CHECKPOINTS_DIR,
    DAMAGE_NOTE,
    EMA_FILE,
    MODEL_FILE,
    SPARE_PREFIX,
    STATE_DIR,
    TMP_PREFIX,
    checkpoints_root,
    human_bytes,
    is_legacy,
    step_dirs,
)
from flowmatch.checkpoint.manifest import Damage, verify_checkpoint
from flowmatch.checkpoint.snapshots import (
    is_listed,
    quarantined_snapshots,
    snapshot_files,
    snapshot_problem,
)

COMPLETE, UNVERIFIED, DAMAGED, QUARANTINED, UNFINISHED = (
    "complete", "unverified", "damaged", "quarantined", "unfinished")


@dataclass
class CheckpointStatus:
    """One directory of ``RUN_DIR/checkpoints``."""

    path: Path
    state: str
    """complete (verified), unverified (written before manifests), damaged, quarantined (renamed by a resume),
    unfinished (a save that never finished: ignored, and removed by the next save)."""
    bytes: int
    damage: list[Damage] = field(default_factory=list)
    """What is wrong (damaged), or the note left at quarantine."""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_run(run_dir: str | os.PathLike[str]) -> list[CheckpointStatus]:
    """The state of every checkpoint of a run: step directories oldest first, then quarantined and unfinished ones,
    then its EMA snapshots (:mod:`.snapshots`) and the quarantined ones.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``checkpoints`` folder.
    """
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINTS_DIR}/ folder: not a run directory, or it has not "
                                "saved a checkpoint yet")
    out = []
    for _, ckpt in step_dirs(root):
        damage = verify_checkpoint(ckpt)
        state = DAMAGED if damage else UNVERIFIED if is_legacy(ckpt) else COMPLETE
        out.append(CheckpointStatus(ckpt, state, _size(ckpt), damage))
    for ckpt in quarantined(root):
        note = ckpt / DAMAGE_NOTE
        lines = note.read_text().splitlines()[1:] if note.is_file() else []
        out.append(CheckpointStatus(ckpt, QUARANTINED, _size(ckpt), [Damage(*line.split(": ", 1)) for line in lines
                                                                     if ": " in line]))
    for tmp in sorted(root.glob(f"{TMP_PREFIX}*")):
        out.append(CheckpointStatus(tmp, UNFINISHED, _size(tmp)))
    return out + _snapshot_statuses(run_dir)


def _snapshot_statuses(run_dir: str | os.PathLike[str]) -> list[CheckpointStatus]:
    """The EMA snapshots of a run (every one hashed), then the quarantined ones."""
    out = []
    for path in snapshot_files(run_dir):
        problem = snapshot_problem(path, hashed=True)
        state = DAMAGED if problem else COMPLETE if is_listed(path) else UNVERIFIED
        out.append(CheckpointStatus(path, state, path.stat().st_size, [Damage(path.name, problem)] if problem else []))
    for path, note in quarantined_snapshots(run_dir):
        out.append(CheckpointStatus(path, QUARANTINED, path.stat().st_size, [Damage(path.name, note)] if note else []))
    return out


def _label(s: CheckpointStatus) -> str:
    """A checkpoint's directory name, or an EMA snapshot's path below the run (ema/snapshots/<step>.safetensors)."""
    return s.path.name if s.path.parent.name == CHECKPOINTS_DIR else "/".join(s.path.parts[-3:])


def newest_is_damaged(statuses: list[CheckpointStatus]) -> bool:
    """Whether the newest step directory is damaged (what ``flowmatch check`` exits non-zero for)."""
    steps = [s for s in statuses if s.path.name.isdigit()]
    return bool(steps) and steps[-1].state == DAMAGED


# The parts of a checkpoint, by where their files are (the first prefix that matches).
_PARTS = ((MODEL_FILE, "weights"), (EMA_FILE, "EMA"), (SPARE_PREFIX, "optimizer for other layouts"),
          (f"{STATE_DIR}/", "run state (RNG, data position, optimizer for this layout)"), ("", "metadata"))


def part_of(name: str) -> str:
    """The part of a checkpoint that the file ``name`` (relative to the checkpoint) belongs to."""
    return next(part for prefix, part in _PARTS if name.startswith(prefix))


def describe_parts(damage: list[Damage]) -> str:
    """Which parts of a damaged checkpoint are intact, and what a resume from it does."""
    bad = {part_of(d.file) for d in damage}
    intact = [part for _, part in _PARTS if part not in bad]
    line = f"damaged: {', '.join(p for _, p in _PARTS if p in bad)}; intact: {', '.join(intact) or 'nothing'}"
    if bad == {part_of(SPARE_PREFIX)}:
        line += " (resumable: on another layout the optimizer state is reset)"
    return line


def format_check(statuses: list[CheckpointStatus]) -> str:
    """A plain-text table, one checkpoint per line, with what is wrong under the damaged ones."""
    if not statuses:
        return "no checkpoints"
    width = max(len(_label(s)) for s in statuses)
    lines = []
    for s in statuses:
        lines.append(f"{_label(s):<{width}}  {human_bytes(s.bytes):>10}  {s.state}")
        lines += [f"{'':<{width}}    {d}" for d in s.damage]
        if s.state == DAMAGED:
            lines.append(f"{'':<{width}}    {describe_parts(s.damage)}")
    intact = [s for s in statuses if s.path.name.isdigit() and s.state in (COMPLETE, UNVERIFIED)]
    lines.append(f"newest intact: {intact[-1].path}" if intact else "no intact checkpoint")
    return "\n".join(lines)
