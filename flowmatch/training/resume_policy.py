"""What a resumed run may change in its recipe: the one table that classifies every recipe key.

A run resumes from its newest checkpoint with the recipe given now (the command line wins). The recipe stored in
the checkpoint is what ran until then; :func:`compare_recipes` sets the two side by side, key by key:

- a key in :data:`SAFE` may change: the new value takes effect from the resumed step on, and the log says
  ``changed on resume: optim.lr 0.003 -> 0.01``;
- any other key may not: the resume stops, before any weight is loaded, with one paragraph naming each differing
  key, both values and why it cannot change (:data:`REFUSED` gives the reason).

A key is looked up by its full dotted name, then by each shorter prefix (``model`` covers every model key). A key
that neither table names is refused (the safe default); tests/hostile/test_resume_and_signals.py checks that
every key of the recipe is named here, so each new key gets a deliberate decision. Checkpoints record the recipe
of the run that wrote them, so the recorded recipe is always what ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from flowmatch.config import recipe_from_yaml, to_yaml
from flowmatch.errors import RecipeError

# Keys that take effect when they change on resume, with what happens (said nowhere; the reason to allow it).
SAFE: dict[str, str] = {
    "run_dir": "where the run is now (a run directory may move)",
    "model.preset": "a name only: the architecture fields it stands for are compared one by one",
    "model.init_from": "the checkpoint's weights replace the initial ones (a LoRA run checks its base by hash)",
    "optim.lr": "the schedule is recomputed with the new peak",
    "optim.warmup_steps": "the schedule is recomputed",
    "optim.schedule": "the schedule is recomputed",
    "optim.min_lr_ratio": "the schedule is recomputed",
    "optim.grad_clip": "read at every update",
    "optim.weight_decay": "an AdamW hyper-parameter, read at every update",
    "optim.betas": "an AdamW hyper-parameter, read at every update",
    "optim.eps": "an AdamW hyper-parameter, read at every update",
    "optim.fused_backward": "the same optimizer state, applied inside backward or after it",
    "train.block_swap": "where the frozen weights wait between uses, not what they hold",
    "text_encoder.offload": "where the encoder waits between uses, not what it computes",
    "train.max_steps": "the schedule's length follows it",
    "train.micro_batch_size": "the global batch stays; the per-slot noise streams are re-seeded",
    "train.checkpoint_every": "read by the loop",
    "train.keep_checkpoints": "read at each save",
    "train.log_every": "read by the loop",
    "train.validate_every": "read by the loop",
    "train.ema_profiles": "other profiles start over at the resumed step (the log says so)",
    "train.ema_snapshot_every": "read by the loop",
    "train.max_bad_steps": "read by the loop",
    "train.divergence_factor": "read at each log step",
    "train.max_bad_windows": "read at each log step",
    "train.compile": "the same computation, compiled or not",
    "train.attention": "the same masked attention through another kernel",
    "train.activation_checkpointing": "the same computation, recomputed or stored",
    "data.val_shards": "validation only",
    "data.num_workers": "the saved streams are finished by the new workers, then the next epoch starts: exact",
    "data.shuffle_buffer": "the saved streams are finished as they were buffered, then the next epoch starts with "
                           "the new buffer: exact",
    "data.prefetch_factor": "loading speed only",
    "data.prepare": "used only when the shards are missing",
    "data.cache": "where the cached features are (they are checked against the encoders)",
    "data.max_image_pixels": "a safety limit on decoding",
    "data.max_member_mb": "a safety limit on decoding",
    "data.remote": "retries and timeouts of remote shards",
    "distributed.zero_stage": "each rank takes its pieces of the saved weights and whole optimizer tensors",
    "distributed.offload_optimizer": "where the optimizer state lives, not what it holds",
    "distributed.offload_params": "where the parameters live, not what they hold",
    "distributed.backend": "how the ranks talk",
    "distributed.timeout_s": "how long a collective may wait",
    "distributed.rendezvous_timeout_s": "how long the start may wait",
    "distributed.zero3_persistence_threshold": "a ZeRO-3 memory trade-off",
    "distributed.elastic_checkpoints": "what the checkpoints written from now on hold",
    "distributed.memory_budget_gb": "it chooses settings the resume checks one by one (micro batch, checkpointing, "
                                    "ZeRO stage, offload), each of which may change",
    "sampling": "validation grids and sampling defaults",
    "logging": "what is logged",
    "eval": "what flowmatch eval measures",
}

# Keys that cannot change on resume, with the reason the error gives.
REFUSED: dict[str, str] = {
    "model.quantize": "the quantised base the adapters were trained against",
    "optim.name": "the optimizer whose state the checkpoint holds (8-bit, factored and AdamW moments differ)",
    "model": "the architecture (and LoRA layout) the checkpoint's weights have",
    "flow": "what the weights were trained to predict",
    "text_encoder": "the conditioning the model learned",
    "text_encoders": "the conditioning the model learned",
    "autoencoder": "the latents the model learned",
    "data.shards": "exact resume continues at a position in these shards",
    "data.sources": "exact resume continues at a position in these shards",
    "data.holdout_fraction": "it decides which samples are trained on",
    "data.resolution": "the images the model learned",
    "data.channels": "the images the model learned",
    "data.shuffle": "exact resume continues the saved data order",
    "data.resampled": "exact resume continues the saved data order",
    "data.buckets": "exact resume continues the saved batch layout",
    "data.bucket_max_aspect": "exact resume continues the saved batch layout",
    "data.bucket_multiple": "exact resume continues the saved batch layout",
    "data.drop_last": "exact resume continues the saved batch layout",
    "data.caption_key": "the captions the model learned",
    "data.paired": "the reference images the model learned to edit from, and the saved batch layout",
    "data.masks": "where each sample's loss counts, as flow.loss is what it measures",
    "data.alpha_masks": "where each sample's loss counts, as flow.loss is what it measures",
    "data.cached": "the features the model learned from (quantised or not)",
    "data.cache_dtype": "the precision of the features the model learned from",
    "data.cache_text_quant": "the quantisation of the features the model learned from",
    "train.batch_size": "exact resume continues the saved data position and noise streams",
    "train.seed": "the data order and noise streams of the run",
    "train.ema_decay": "the EMA the checkpoint holds",
    "train.ema_warmup": "the EMA the checkpoint holds",
    "distributed.precision": "the precision of the weights and optimizer state",
}

_MISSING = object()


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the checkpoint's recipe and the one given now."""

    key: str
    old: Any
    new: Any
    safe: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


def classify(key: str) -> Optional[tuple[bool, str]]:
    """(safe, reason) for a dotted recipe key, from its longest classified prefix; None when no table names it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in SAFE:
            return True, SAFE[prefix]
        if prefix in REFUSED:
            return False, REFUSED[prefix]
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested mapping as (dotted key, value); an empty mapping or a list is a leaf."""
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def compare_recipes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[Change]:
    """Each key whose value differs between the recipe tree ``saved`` (a checkpoint's) and ``now``, classified."""
    old, new = dict(flatten(saved)), dict(flatten(now))
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        found = classify(key)
        safe, reason = found if found is not None else (False, "no resume policy names this key")
        changes.append(Change(key, a, b, safe, reason))
    return changes


def changes_on_resume(saved_yaml: str, now_yaml: str) -> list[Change]:
    """:func:`compare_recipes` of a checkpoint's recipe.yaml and the resolved recipe given now (YAML texts). Keys
    added to the recipe since the checkpoint was written take their defaults, as the run that wrote it had them."""
    try:
        saved = yaml.safe_load(to_yaml(recipe_from_yaml(saved_yaml)))
    except RecipeError:  # a key since removed: compare as written
        saved = yaml.safe_load(saved_yaml) or {}
    return compare_recipes(saved, yaml.safe_load(now_yaml) or {})


def refusal(ckpt: object, refused: list[Change]) -> str:
    """The paragraph that stops a resume: each key that cannot change, both values, and what to do."""
    keys = "; ".join(f"{c} ({c.reason})" for c in refused)
    return (f"the recipe differs from the one checkpoint {ckpt} was trained with in keys that cannot change on "
            f"resume: {keys}. Set them back to the checkpoint's values to resume (its recipe.yaml holds them), or "
            "start a new run_dir (model.init_from can take the checkpoint's weights).")
