"""Checkpoints of a training run: atomic, verified, self-describing directories under ``RUN_DIR/checkpoints/<step>/``.

Layout of one checkpoint::

    RUN_DIR/checkpoints/<step>/
        model.safetensors   consolidated trainable weights, fp32 (from the fp32 masters): the whole model, or a
                            LoRA run's adapters (its base is recorded in meta.json's init_from, with its hash)
        ema.safetensors     consolidated EMA weights, fp32 (only when the run keeps an EMA)
        recipe.yaml         the resolved recipe of the run
        meta.json           step, whether EMA is present, time, versions, where the starting weights came from
                            (:class:`CheckpointMeta`)
        state/              the engine's full training state (:meth:`flowmatch.engine.Engine.save`): per rank its
                            RNG states, loop state, EMA partition and optimizer partition (fp32 masters, AdamW
                            moments) as safetensors + JSON; state/engine.json, the one record of the distributed
                            layout that wrote it (world size, ZeRO stage, precision: :func:`read_layout`)
        manifest.json       every other file with its size and SHA-256; written last (:mod:`.manifest`)

Modules: :mod:`.layout` (names, ``meta.json``), :mod:`.manifest` (hashing and verification), :mod:`.save` (atomic
writes, pruning, a full disk), :mod:`.fallback` (the newest checkpoint that verifies; quarantine),
:mod:`.load` (readers and resume) and :mod:`.check` (``flowmatch check RUN``).

Guarantees: a directory named by a step appears only once all its files and its manifest are on disk (a kill at
any moment leaves the previous checkpoints as they were); every reader verifies what it reads against the
manifest and falls back to the newest checkpoint that verifies, saying which it skipped and why; nothing in a run
directory is unpickled. Multi-node runs need ``RUN_DIR`` on a filesystem that every node sees.

This package has no DeepSpeed code: it drives the engine through the methods named in :class:`EngineLike`.
"""

from flowmatch.checkpoint.check import CheckpointStatus, check_run, format_check, newest_is_damaged
from flowmatch.checkpoint.fallback import latest_checkpoint, quarantine, resolve_checkpoint, select_for_resume
from flowmatch.checkpoint.layout import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    RECIPE_FILE,
    STATE_DIR,
    CheckpointError,
    CheckpointMeta,
    weights_file,
)
from flowmatch.checkpoint.load import (
    Resumed,
    load_checkpoint,
    load_recipe_yaml,
    load_weights,
    read_layout,
    read_meta,
    resume_checkpoint,
)
from flowmatch.checkpoint.manifest import Damage, verify_checkpoint
from flowmatch.checkpoint.save import EngineLike, save_checkpoint

__all__ = [
    "CHECKPOINTS_DIR",
    "EMA_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "META_FILE",
    "MODEL_FILE",
    "RECIPE_FILE",
    "STATE_DIR",
    "CheckpointError",
    "CheckpointMeta",
    "CheckpointStatus",
    "Damage",
    "EngineLike",
    "Resumed",
    "check_run",
    "format_check",
    "latest_checkpoint",
    "load_checkpoint",
    "load_recipe_yaml",
    "load_weights",
    "newest_is_damaged",
    "quarantine",
    "read_layout",
    "read_meta",
    "resolve_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
    "select_for_resume",
    "verify_checkpoint",
    "weights_file",
]
