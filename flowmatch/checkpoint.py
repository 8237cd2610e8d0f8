"""Checkpoints of a training run: atomic, self-describing directories under ``RUN_DIR/checkpoints/<step>/``.

Layout of one checkpoint::

    RUN_DIR/checkpoints/<step>/
        model.safetensors   consolidated weights, fp32 (from the fp32 masters)
        ema.safetensors     consolidated EMA weights, fp32 (only when the run keeps an EMA)
        recipe.yaml         the resolved recipe of the run
        meta.json           step, whether EMA is present and is the default weights, time, versions
                            (:class:`CheckpointMeta`)
        state/              the engine's full training state (:meth:`flowmatch.engine.Engine.save`), with
                            state/engine.json, the one record of the distributed layout that wrote it
                            (world size, ZeRO stage, precision: :func:`read_layout`)

Atomicity: all ranks write into ``RUN_DIR/checkpoints/.tmp-<step>-<random>/``; after a barrier rank 0 fsyncs
every file and renames the directory to ``<step>/``. A rename inside one directory is atomic on POSIX
filesystems, so a directory named by a step is always complete, and a kill at any moment (SIGKILL included)
leaves at most a ``.tmp-*`` directory, which readers ignore and the next save deletes. Old checkpoints are
pruned the same way: renamed to a dot-name first, then deleted. Multi-node runs need ``RUN_DIR`` on a
filesystem that every node sees.

Weights are read with safetensors only. The engine state holds DeepSpeed's own files, which DeepSpeed loads
with ``torch.load(weights_only=False)``; those are only ever read back by :func:`load_checkpoint` from a run
directory this project wrote.

This module has no DeepSpeed code: it drives the engine through the methods named in :class:`EngineLike`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

import flowmatch
from flowmatch.engine.state import EngineMeta, read_engine_meta

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RECIPE_FILE = "recipe.yaml"
META_FILE = "meta.json"
STATE_DIR = "state"
# 2: the distributed layout (world size, ZeRO stage, precision) left meta.json; state/engine.json records it.
FORMAT_VERSION = 2
_TMP_PREFIX = ".tmp-"


class EngineLike(Protocol):
    """The part of :class:`flowmatch.engine.Engine` that checkpointing uses."""

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> None: ...

    def load(self, directory: str | os.PathLike[str], *, fallback_weights: str | os.PathLike[str] | None = None,
             fallback_ema: str | os.PathLike[str] | None = None) -> dict[str, Any]: ...

    def model_state_dict(self) -> dict[str, torch.Tensor]: ...

    def ema_state_dict(self) -> dict[str, torch.Tensor]: ...


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


def _discard(path: Path) -> None:
    """Delete a directory so that no partially deleted copy ever carries its original name."""
    trash = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(d.name), d) for d in root.iterdir()
             if d.name.isdigit() and d.is_dir() and (d / META_FILE).is_file()]
    return sorted(found)


def save_checkpoint(engine: EngineLike, run_dir: str | os.PathLike[str], step: int, *,
                    client_state: Mapping[str, Any], recipe_yaml: str, keep: int, ema: bool,
                    ema_default: bool | None = None) -> Path:
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

    Returns:
        The checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / engine.broadcast_object(f"{_TMP_PREFIX}{step}-{secrets.token_hex(4)}" if engine.is_main else "")
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a save or prune that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    engine.save(tmp / STATE_DIR, client_state)
    weights = engine.model_state_dict()
    ema_weights = engine.ema_state_dict() if ema else None
    final = root / str(step)
    if engine.is_main:
        metadata = {"step": str(step)}
        save_file(weights, str(tmp / MODEL_FILE), metadata=metadata)
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / EMA_FILE), metadata=metadata)
        (tmp / RECIPE_FILE).write_text(recipe_yaml)
        meta = CheckpointMeta(step=step, ema=ema_weights is not None, created=time.time(),
                              flowmatch_version=flowmatch.__version__,
                              ema_default=None if ema_weights is None else ema_default)
        # meta.json last: its presence is what marks a checkpoint complete (the rename makes it visible).
        (tmp / META_FILE).write_text(json.dumps(meta.__dict__, indent=1))
    engine.barrier()  # every rank's shard of the engine state is written
    if engine.is_main:
        _fsync_tree(tmp)
        if final.exists():
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in _complete(root)[:-keep]:
            if old != final:
                _discard(old)
    engine.barrier()
    return final


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (``RUN_DIR/checkpoints/<step>``), or None if there is none."""
    found = _complete(Path(run_dir) / CHECKPOINTS_DIR)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from ``path``: a checkpoint itself, or a run directory (then its newest one).

    Raises:
        FileNotFoundError: naming what was expected, when ``path`` is neither.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: expected a run directory (RUN_DIR) or a checkpoint "
                                f"(RUN_DIR/{CHECKPOINTS_DIR}/<step>)")
    if (p / META_FILE).is_file():
        return p
    if p.name.isdigit() and p.parent.name == CHECKPOINTS_DIR:
        raise FileNotFoundError(f"{p} is not a complete checkpoint ({META_FILE} missing; it was probably being "
                                f"written when the run stopped): use {p.parent.parent} for its newest complete one")
    found = latest_checkpoint(p.parent if p.name == CHECKPOINTS_DIR else p)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {p}: train first or point at RUN_DIR/{CHECKPOINTS_DIR}/<step>")
    return found


def read_meta(ckpt_dir: str | os.PathLike[str]) -> CheckpointMeta:
    """The :class:`CheckpointMeta` of a checkpoint (or of a run directory's newest checkpoint)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    saved = json.loads((ckpt / META_FILE).read_text())
    # Format 1 also recorded the distributed layout here; read_layout reads it from the engine state now.
    return CheckpointMeta(**{f.name: saved[f.name] for f in fields(CheckpointMeta) if f.name in saved})


def read_layout(ckpt_dir: str | os.PathLike[str]) -> EngineMeta:
    """World size, ZeRO stage and precision (with the engine's counters) of the run that wrote a checkpoint (or
    a run directory's newest checkpoint), from its engine state."""
    return read_engine_meta(resolve_checkpoint(ckpt_dir) / STATE_DIR)


def load_weights(ckpt_dir: str | os.PathLike[str], *, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (CPU) of a checkpoint or of a run directory's newest checkpoint.

    Args:
        ckpt_dir: a checkpoint directory or a run directory.
        ema: True for the EMA weights, False for the raw weights, None for the checkpoint's default: the weights
            validation found better (:attr:`CheckpointMeta.ema_default`), else the EMA when present.
    """
    ckpt = resolve_checkpoint(ckpt_dir)
    has_ema = (ckpt / EMA_FILE).is_file()
    if ema and not has_ema:
        raise FileNotFoundError(f"{ckpt} has no {EMA_FILE}: that run kept no EMA; load the raw weights (ema=False)")
    use_ema = (has_ema and read_meta(ckpt).ema_default is not False) if ema is None else ema
    return load_file(str(ckpt / (EMA_FILE if use_ema else MODEL_FILE)))


def load_recipe_yaml(ckpt_dir: str | os.PathLike[str]) -> str:
    """The resolved recipe (YAML text) stored with a checkpoint or with a run directory's newest checkpoint."""
    return (resolve_checkpoint(ckpt_dir) / RECIPE_FILE).read_text()


def load_checkpoint(engine: EngineLike, ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Collective: restore the engine from a checkpoint (or a run directory's newest); returns client_state.

    Call after ``engine.setup`` (and ``engine.ema_init`` when the run keeps an EMA). When the ZeRO stage, world
    size or precision differ from the run that wrote it, the engine falls back to the consolidated weights and
    EMA of the checkpoint and warns that optimizer moments restart (see :meth:`flowmatch.engine.Engine.load`).
    """
    ckpt = resolve_checkpoint(ckpt_dir)
    ema = ckpt / EMA_FILE
    return engine.load(ckpt / STATE_DIR, fallback_weights=ckpt / MODEL_FILE,
                       fallback_ema=ema if ema.is_file() else None)
