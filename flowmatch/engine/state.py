"""The engine's full training state on disk (:meth:`Engine.save` and :meth:`Engine.load`), and ``engine.json``.

Nothing is pickled by this project: each rank's ``client_state`` is JSON with its tensors in safetensors, next to
the python, numpy and torch RNG states. DeepSpeed's own model, optimizer and scheduler files go under
``deepspeed/`` inside the same directory. ``engine.json`` (:class:`EngineMeta`) is the one record of the
distributed layout that wrote a state (world size, ZeRO stage, precision); read it with :func:`read_engine_meta`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.ema import Ema
from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.trainable import Trainable
from flowmatch.engine.zero import Zero

log = logging.getLogger(__name__)

ENGINE_META_FILE = "engine.json"
_STATE_FORMAT = 1
_TENSOR_TAG, _TUPLE_TAG = "__tensor__", "__tuple__"


@dataclass
class EngineMeta:
    """Contents of ``engine.json``: the layout that wrote an engine state, and the engine's counters."""

    world_size: int
    """Number of processes that wrote it."""
    zero_stage: int
    """ZeRO stage of the run that wrote it."""
    precision: str
    """Training precision of that run (a name of :data:`flowmatch.dtypes.DTYPES`)."""
    optimizer_steps: int
    """Updates applied (the learning-rate schedule's position)."""
    skipped_steps: int
    """Accumulation windows discarded for a non-finite loss."""
    global_steps: int
    """DeepSpeed's count of step boundaries, applied or not."""
    ema_decay: float | None
    """Decay of the saved EMA; None when the run kept none."""
    ema_updates: int | None = None
    """Updates blended into the saved EMA (its warm-up position); None when the run kept none, and in states
    written before it was recorded, whose EMA took one update per optimizer step."""
    format: int = _STATE_FORMAT
    """Layout version of the state directory."""


def read_engine_meta(directory: str | os.PathLike[str]) -> EngineMeta:
    """The :class:`EngineMeta` of an engine state directory written by :meth:`Engine.save`."""
    path = Path(directory) / ENGINE_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no engine state in {directory} ({ENGINE_META_FILE} missing): expected a directory "
                                f"written by Engine.save, e.g. RUN_DIR/checkpoints/<step>/state")
    return EngineMeta(**json.loads(path.read_text()))


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str = "client_state") -> Any:
    """JSON form of ``obj``: tensors move into ``tensors`` (written with safetensors), tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        key = f"client.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_TAG: key}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r}: client_state keys must be strings")
            out[k] = _encode_state(v, tensors, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {_TUPLE_TAG: items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__}: client_state may hold dicts with string keys, lists, "
                    "tuples, numbers, strings, None and tensors")


def _decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode_state`."""
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR_TAG}:
            return tensors[obj[_TENSOR_TAG]]
        if obj.keys() == {_TUPLE_TAG}:
            return tuple(_decode_state(v, tensors) for v in obj[_TUPLE_TAG])
        return {k: _decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    return obj


def _rng_state_json() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"python": [version, list(py_state), py_gauss],
            "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}


def _restore_rng(state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])


class TrainingState:
    """Saving and restoring everything a run needs to go on, from the engine's parts.

    Args:
        cfg: the ``distributed`` settings of this run.
        group: its process group.
        zero: the ZeRO layout of the weights.
        trainable: the wrapped model with its optimizer and schedule.
        ema: the EMA, when the run keeps one.
    """

    def __init__(self, cfg: DistributedConfig, group: ProcessGroup, zero: Zero, trainable: Trainable,
                 ema: Ema | None) -> None:
        self._cfg, self._group, self._zero, self._trainable, self._ema = cfg, group, zero, trainable, ema

    def meta(self) -> EngineMeta:
        """This run's :class:`EngineMeta` as of now."""
        t = self._trainable
        return EngineMeta(world_size=self._group.world_size, zero_stage=self._cfg.zero_stage,
                          precision=self._cfg.precision, optimizer_steps=t.optimizer_steps,
                          skipped_steps=t.skipped_steps, global_steps=t.global_steps,
                          ema_decay=None if self._ema is None else self._ema.decay,
                          ema_updates=None if self._ema is None else self._ema.updates)

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> None:
        """Collective: write the full training state of every rank (see :meth:`flowmatch.engine.Engine.save`)."""
        group = self._group
        if self._trainable.in_window:
            raise RuntimeError("Engine.save must be called between updates, not inside an accumulation window")
        tensors = {"rng.torch": torch.get_rng_state()}
        payload = json.dumps({"client_state": _encode_state(client_state, tensors), "rng": _rng_state_json()})
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i:03d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self._ema is not None and (self._zero.partitioned or group.is_main):
            tensors.update(self._ema.local_tensors())
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._trainable.save_deepspeed(out)
        save_file(tensors, str(out / f"rank{group.rank:05d}.safetensors"))
        (out / f"rank{group.rank:05d}.json").write_text(payload)
        if group.is_main:
            (out / ENGINE_META_FILE).write_text(json.dumps(asdict(self.meta()), indent=1))
        group.barrier()

    def load(self, directory: str | os.PathLike[str], *, fallback_weights: str | os.PathLike[str] | None = None,
             fallback_ema: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Collective: restore what :meth:`save` wrote (see :meth:`flowmatch.engine.Engine.load`)."""
        group, src = self._group, Path(directory)
        saved_meta = read_engine_meta(src)
        here = self.meta()
        same = (saved_meta.world_size, saved_meta.zero_stage, saved_meta.precision) == (
            here.world_size, here.zero_stage, here.precision)
        if same:
            self._trainable.load_deepspeed(src)
            self._trainable.restore_counts(skipped_steps=saved_meta.skipped_steps)
        else:
            if group.is_main:
                log.warning("checkpoint %s was written by ZeRO-%d, %s, %d process(es); this run is ZeRO-%d, %s, %d "
                            "process(es). DeepSpeed cannot re-shard its optimizer state, so only the weights%s and "
                            "the schedule position are restored: AdamW moments restart from zero",
                            src, saved_meta.zero_stage, saved_meta.precision, saved_meta.world_size,
                            here.zero_stage, here.precision, here.world_size,
                            " and EMA" if fallback_ema is not None else "")
            if fallback_weights is None:
                raise ValueError(f"{src} holds a different layout; pass fallback_weights=<model.safetensors>")
            self._zero.load_whole(self._trainable.module, Path(fallback_weights))
            self._trainable.refresh_masters()
            self._trainable.restore_counts(skipped_steps=saved_meta.skipped_steps,
                                           optimizer_steps=saved_meta.optimizer_steps,
                                           global_steps=saved_meta.global_steps)
        if self._ema is not None:
            self._restore_ema(src, saved_meta, same, fallback_ema)
        own = group.rank if group.rank < saved_meta.world_size else 0
        if own != group.rank:
            log.warning("rank %d did not exist when %s was saved: it keeps its seeded RNG and takes rank 0's "
                        "client_state", group.rank, src)
        saved = json.loads((src / f"rank{own:05d}.json").read_text())
        tensors = load_file(str(src / f"rank{own:05d}.safetensors"))
        if own == group.rank:
            _restore_rng(saved["rng"], tensors)
        return _decode_state(saved["client_state"], tensors)

    def _restore_ema(self, src: Path, saved_meta: EngineMeta, same: bool,
                     fallback: str | os.PathLike[str] | None) -> None:
        assert self._ema is not None
        updates = saved_meta.optimizer_steps if saved_meta.ema_updates is None else saved_meta.ema_updates
        if same and saved_meta.ema_decay is not None:
            ema_rank = self._group.rank if self._zero.partitioned else 0
            self._ema.load_local(load_file(str(src / f"rank{ema_rank:05d}.safetensors")), updates)
        elif not same and fallback is not None and Path(fallback).is_file():
            self._ema.load_whole(load_file(str(fallback)), updates)
        else:
            if self._group.is_main:
                log.warning("the checkpoint has no EMA: the EMA restarts from the loaded weights")
            self._ema.restart()
