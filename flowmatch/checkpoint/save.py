"""Writing a checkpoint: atomically, with its manifest last, and with a clear stop when the disk is full.

All ranks write into ``RUN_DIR/checkpoints/.tmp-<step>-<random>/``; each hashes what it wrote; rank 0 writes the
manifest, fsyncs every file and renames the directory to ``<step>/``. A rename inside one directory is atomic on
POSIX filesystems, so a directory named by a step appears complete or not at all, and a kill at any moment
(SIGKILL included) leaves at most a ``.tmp-*`` directory, which readers ignore and the next save deletes. Old
checkpoints are pruned the same way: renamed to a dot-name first, then deleted.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from flowmatch.checkpoint.layout import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    META_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    STATE_DIR,
    TMP_PREFIX,
    CheckpointError,
    CheckpointMeta,
    human_bytes,
    looks_complete,
    step_dirs,
)
from flowmatch.checkpoint.manifest import describe_files, listed_bytes, write_manifest
from flowmatch.engine.state import write_safetensors
from flowmatch.version import __version__

# A full disk, or a full quota.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class EmaLike(Protocol):
    """The part of :class:`flowmatch.engine.ema.Ema` that checkpointing uses."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class EngineLike(Protocol):
    """The part of :class:`flowmatch.engine.Engine` that checkpointing uses."""

    @property
    def is_main(self) -> bool: ...

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def barrier(self) -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> list[Path]: ...

    def load(self, directory: str | os.PathLike[str], *, weights: str | os.PathLike[str],
             ema: str | os.PathLike[str] | None = None, elastic: bool = True) -> dict[str, Any]: ...

    def model_state_dict(self) -> dict[str, torch.Tensor]: ...

    @property
    def ema(self) -> EmaLike | None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename is still atomic there
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def discard(path: Path) -> None:
    """Delete a directory so that no partially deleted copy ever carries its original name."""
    trash = path.with_name(f"{TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_files(engine: EngineLike, tmp: Path, step: int, client_state: Mapping[str, Any], recipe_yaml: str,
                 ema: bool, ema_default: bool | None, init_from: Mapping[str, Any] | None,
                 paths: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Collective: every file of the checkpoint into ``tmp``; returns the manifest entries of this rank's files."""
    written = list(engine.save(tmp / STATE_DIR, client_state))
    weights = engine.model_state_dict()
    ema_weights = None
    if ema:
        if engine.ema is None:
            raise RuntimeError("a checkpoint with its EMA needs the engine's EMA: call engine.init_ema(...) first")
        ema_weights = engine.ema.state_dict()
    if engine.is_main:
        metadata = {"step": str(step)}
        written.append(write_safetensors(tmp / MODEL_FILE, weights, metadata))
        if ema_weights is not None:
            written.append(write_safetensors(tmp / EMA_FILE, ema_weights, metadata))
        written.append(_write_text(tmp / RECIPE_FILE, recipe_yaml))
        meta = CheckpointMeta(step=step, ema=ema_weights is not None, created=time.time(),
                              flowmatch_version=__version__,
                              ema_default=None if ema_weights is None else ema_default,
                              init_from=None if init_from is None else dict(init_from),
                              paths=dict(paths) if paths else None)
        written.append(_write_text(tmp / META_FILE, json.dumps(asdict(meta), indent=1)))
    return describe_files(tmp, written, engine.rank)


def _no_space(root: Path, tmp: Path, step: int, err: OSError) -> CheckpointError:
    """The error for a save that filled the disk, after removing its unfinished directory."""
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free
    previous = [d for _, d in step_dirs(root) if looks_complete(d)]
    need = listed_bytes(previous[-1]) if previous else None
    if previous and need is not None:
        size = (f"A checkpoint of this run takes {human_bytes(need)} ({need:,} bytes, measured on {previous[-1]}); "
                f"{human_bytes(free)} are free. The previous checkpoint {previous[-1]} is intact.")
    else:
        need = written
        size = (f"It had written {human_bytes(written)} ({written:,} bytes) when the disk filled, and needs more; "
                f"{human_bytes(free)} are free.")
    return CheckpointError(f"no space left on the device of {root} while writing checkpoint {step} "
                           f"({err.strerror}). {size} Make more than {human_bytes(need)} free there (or point run_dir "
                           f"elsewhere), then run the same command to resume.")


def save_checkpoint(engine: EngineLike, run_dir: str | os.PathLike[str], step: int, *,
                    client_state: Mapping[str, Any], recipe_yaml: str, keep: int, ema: bool,
                    ema_default: bool | None = None, init_from: Mapping[str, Any] | None = None,
                    paths: Mapping[str, str] | None = None) -> Path:
    """Collective: write checkpoint ``RUN_DIR/checkpoints/<step>/`` atomically, then keep only the newest ``keep``.

    Args:
        engine: the training engine (every rank calls this with its own engine).
        run_dir: the run directory, on a filesystem shared by all ranks.
        step: optimizer steps completed; names the checkpoint (an existing one of that step is replaced).
        client_state: this rank's loop state (step, data position, ...), JSON-serialisable.
        recipe_yaml: the resolved recipe, stored as ``recipe.yaml``.
        keep: how many checkpoints to keep (>= 1), counting this one.
        ema: also write ``ema.safetensors`` (the engine must have an EMA).
        ema_default: whether pipelines load the EMA (True) or the raw weights (False) by default, as validation
            found; None = not measured (the EMA when present).
        init_from: where the run's starting weights came from (:class:`flowmatch.init_from.InitRecord` as a dict),
            kept in ``meta.json``; the base of a LoRA run's adapters.
        paths: recipe key -> absolute path of each relative local path in the recipe
            (:func:`flowmatch.run.record_paths`), kept in ``meta.json`` so the run opens from any directory.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: the disk (or quota) filled up; the unfinished save is removed, the previous checkpoint
            is intact, and the message names the directory, the bytes a checkpoint needs and the bytes free.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / engine.broadcast_object(f"{TMP_PREFIX}{step}-{secrets.token_hex(4)}" if engine.is_main else "")
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a save or prune that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    final = root / str(step)
    try:
        files = _write_files(engine, tmp, step, client_state, recipe_yaml, ema, ema_default, init_from, paths)
        everything = {k: v for part in engine.all_gather_object(files) for k, v in part.items()}
        if engine.is_main:
            write_manifest(tmp, step, everything)  # last: only a verified manifest makes a checkpoint complete
            _fsync_tree(tmp)
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        raise _no_space(root, tmp, step, err) from None
    if engine.is_main:
        if final.exists():
            discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in [d for _, d in step_dirs(root) if looks_complete(d)][:-keep]:
            if old != final:
                discard(old)
    engine.barrier()
    return final
