"""A run directory, opened once: the checkpoint (:func:`~flowmatch.checkpoint.resolve_checkpoint`), its recipe
(read and verified, its relative paths resolved where the run was recorded: :mod:`.paths`), its weights (raw, EMA,
reconstructed EMA snapshots), its model and a LoRA run's base weights (:mod:`.open`).

Everything that reads a finished run goes through here: :class:`flowmatch.pipeline.Pipeline`, `flowmatch export`,
`model.init_from` of a run, the few-step teacher (``flow.teacher``) and `flowmatch eval` / `flowmatch ema --eval`.
"""

from flowmatch.checkpoint import read_meta, resolve_checkpoint
from flowmatch.run.open import (
    ENCODER_SECTIONS,
    OpenedRun,
    checkpoint_model,
    lora_base,
    open_run,
    read_recipe,
    source_architecture,
)
from flowmatch.run.paths import RunAssetMissing, path_keys, record_paths, relocated

__all__ = [
    "ENCODER_SECTIONS",
    "OpenedRun",
    "RunAssetMissing",
    "checkpoint_model",
    "lora_base",
    "open_run",
    "path_keys",
    "read_meta",
    "read_recipe",
    "record_paths",
    "relocated",
    "resolve_checkpoint",
    "source_architecture",
]
