"""Reading a checkpoint: each reader verifies the files it reads; resuming verifies all of them on all ranks.

Weights are read with safetensors, everything else is JSON or YAML: nothing in a run directory is unpickled, so
one that came from elsewhere cannot run code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flowmatch.checkpoint.fallback import (
    damaged_message,
    resolve_checkpoint,
    select_with_damage,
    split_damage,
    verify_together,
)
from flowmatch.checkpoint.layout import (
    EMA_FILE,
    META_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    STATE_DIR,
    CheckpointError,
    CheckpointMeta,
    names_a_checkpoint,
    parse_meta,
    weights_file,
)
from flowmatch.checkpoint.manifest import Damage
from flowmatch.checkpoint.save import EngineLike
from flowmatch.engine.state import ENGINE_META_FILE, EngineMeta, read_engine_meta

log = logging.getLogger(__name__)


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """The :class:`CheckpointMeta` of a checkpoint (or of a run directory's newest intact checkpoint)."""
    ckpt = resolve_checkpoint(path, reads=lambda c: (META_FILE,))
    return parse_meta((ckpt / META_FILE).read_text())


def read_layout(path: str | os.PathLike[str]) -> EngineMeta:
    """World size, ZeRO stage and precision (with the engine's counters) of the run that wrote a checkpoint (or
    a run directory's newest intact checkpoint), from its engine state."""
    ckpt = resolve_checkpoint(path, reads=lambda c: (f"{STATE_DIR}/{ENGINE_META_FILE}",))
    return read_engine_meta(ckpt / STATE_DIR)


def load_weights(path: str | os.PathLike[str], *, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (CPU) of a checkpoint or of a run directory's newest intact checkpoint.

    Args:
        path: a checkpoint directory or a run directory.
        ema: True for the EMA weights, False for the raw weights, None for the checkpoint's default: the weights
            validation found better (:attr:`CheckpointMeta.ema_default`), else the EMA when present.
    """
    ckpt = resolve_checkpoint(path, reads=lambda c: (weights_file(c, ema),))
    return load_file(str(ckpt / weights_file(ckpt, ema)))


def load_recipe_yaml(path: str | os.PathLike[str]) -> str:
    """The resolved recipe (YAML text) stored with a checkpoint or with a run directory's newest intact one."""
    return (resolve_checkpoint(path, reads=lambda c: (RECIPE_FILE,)) / RECIPE_FILE).read_text()


def _restore(engine: EngineLike, ckpt: Path, spare: list[Damage]) -> dict[str, Any]:
    ema = ckpt / EMA_FILE
    if spare and engine.is_main:
        log.warning("checkpoint %s: %s; the resume goes on without them (a resume on another layout then resets "
                    "the optimizer state)", ckpt, "; ".join(str(d) for d in spare))
    return engine.load(ckpt / STATE_DIR, weights=ckpt / MODEL_FILE, ema=ema if ema.is_file() else None,
                       elastic=not spare)


def load_checkpoint(engine: EngineLike, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Collective: restore the engine from a checkpoint (or a run directory's newest intact one); returns this
    rank's client_state.

    Every file is verified first, all ranks sharing the hashing; a damaged checkpoint named explicitly raises
    :class:`CheckpointError` on every rank. Call after ``engine.setup`` (and ``engine.init_ema`` when the run keeps
    an EMA). When the ZeRO stage, world size or precision differ from the run that wrote it, the engine re-shards
    the optimizer state from its whole tensors (see :meth:`flowmatch.engine.Engine.load`); when those alone are
    damaged, the resume goes on and, on another layout, resets the optimizer state with a warning.
    """
    p = Path(path)
    if names_a_checkpoint(p):
        damage, spare = split_damage(verify_together(engine, p))
        if damage:
            raise CheckpointError(damaged_message(p, damage))
        return _restore(engine, p, spare)
    resumed = resume_checkpoint(engine, p)
    if resumed is None:
        raise FileNotFoundError(f"no checkpoint under {p}: train first or point at RUN_DIR/checkpoints/<step>")
    return resumed.client_state


@dataclass
class Resumed:
    """What :func:`resume_checkpoint` restored."""

    path: Path
    """The checkpoint directory."""
    client_state: dict[str, Any]
    """This rank's client_state, as saved."""


def resume_checkpoint(engine: EngineLike, run_dir: str | os.PathLike[str], *,
                      check: Callable[[Path], None] | None = None) -> Resumed | None:
    """Collective: restore the engine from the newest checkpoint of ``run_dir`` that verifies; None when the run
    has none yet. Damaged newer ones are quarantined and reported (:func:`~flowmatch.checkpoint.select_for_resume`).
    ``check(ckpt)`` runs on every rank once the checkpoint has verified and before anything is loaded from it (to
    refuse it with a clear error, e.g. a recipe that cannot resume it).
    """
    ckpt, spare = select_with_damage(engine, run_dir)
    if ckpt is None:
        return None
    if check is not None:
        check(ckpt)
    return Resumed(ckpt, _restore(engine, ckpt, spare))
