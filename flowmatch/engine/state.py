"""The engine's full training state on disk: :meth:`Engine.save` and :meth:`Engine.load`.

Nothing is pickled by this project: each rank's ``client_state`` is JSON with its tensors in safetensors, next to
the python, numpy and torch RNG states. DeepSpeed's own model, optimizer and scheduler files go under
``deepspeed/`` inside the same directory.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowmatch.ema import ShadowEma
from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.optim import SkippableLambdaLR

log = logging.getLogger(__name__)

# DeepSpeed writes its own files under this tag inside the directory given to Engine.save.
_DS_TAG = "deepspeed"
_STATE_FORMAT = 1
_TENSOR_TAG, _TUPLE_TAG = "__tensor__", "__tuple__"


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


class TrainingStateMixin:
    """Saving and restoring everything a run needs to go on: part of :class:`flowmatch.engine.Engine`.

    Uses the engine's attributes declared below, its collectives (``barrier``), the EMA (:class:`EmaMixin`)
    and whole-weight loading (:class:`WeightsMixin`).
    """

    cfg: DistributedConfig
    _ds: Any
    _rank: int
    _world_size: int
    _scheduler: SkippableLambdaLR | None
    _named_params: list[tuple[str, torch.nn.Parameter]]
    _micro: int
    _skipped_steps: int
    _ema: ShadowEma | None

    def _layout(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "world_size": self._world_size, "zero_stage": self.cfg.zero_stage,
                "precision": self.cfg.precision, "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self._skipped_steps, "global_steps": int(self._ds.global_steps),
                "ema_decay": None if self._ema is None else self._ema.decay}

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> None:
        """Collective: write the full training state of every rank into ``directory`` (shared by all ranks).

        Written: DeepSpeed's model, optimizer and scheduler state (subdirectory ``deepspeed/``), and per rank
        ``rank<NNNNN>.json`` (``client_state``, python and numpy RNG) and ``rank<NNNNN>.safetensors`` (torch RNG,
        tensors of ``client_state``, EMA: each rank's partition under ZeRO-3, rank 0 only otherwise), plus
        ``engine.json`` (layout) by rank 0. Nothing is pickled. ``client_state`` is this rank's own (e.g. its data
        position): dicts with string keys, lists, tuples, numbers, strings, None and tensors.
        Call between updates (not inside an accumulation window).
        """
        ds = self._require_setup()
        self._require_trainable_weights()
        if self._micro:
            raise RuntimeError("Engine.save must be called between updates, not inside an accumulation window")
        tensors = {"rng.torch": torch.get_rng_state()}
        payload = json.dumps({"client_state": _encode_state(client_state, tensors), "rng": _rng_state_json()})
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i:03d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self._ema is not None and (self.cfg.zero_stage == 3 or self.is_main):
            tensors.update({f"ema.{name}": t.detach().cpu().contiguous()
                            for (name, _), t in zip(self._named_params, self._ema.shadow)})
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        ds.save_checkpoint(str(out), tag=_DS_TAG, save_latest=False)
        save_file(tensors, str(out / f"rank{self._rank:05d}.safetensors"))
        (out / f"rank{self._rank:05d}.json").write_text(payload)
        if self.is_main:
            (out / "engine.json").write_text(json.dumps(self._layout(), indent=1))
        self.barrier()

    def load(self, directory: str | os.PathLike[str], *, fallback_weights: str | os.PathLike[str] | None = None,
             fallback_ema: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Collective: restore what :meth:`save` wrote (call after :meth:`setup` and :meth:`ema_init`).

        With the same ZeRO stage, world size and precision everything is restored exactly: weights, AdamW state,
        schedule, EMA, RNG states, counters. Otherwise DeepSpeed's sharded optimizer state cannot be re-split
        here, so the weights come from ``fallback_weights`` (consolidated safetensors), the EMA from
        ``fallback_ema``, the schedule position from the layout, AdamW moments restart from zero, and a warning
        says so. Returns this rank's ``client_state`` (rank 0's when this rank did not exist at save time).
        """
        self._require_setup()
        src = Path(directory)
        if not (src / "engine.json").is_file():
            raise FileNotFoundError(f"no engine state in {src} (engine.json missing): expected a directory written by "
                                    f"Engine.save, e.g. RUN_DIR/checkpoints/<step>/state")
        layout = json.loads((src / "engine.json").read_text())
        same = (layout["world_size"], layout["zero_stage"], layout["precision"]) == (
            self._world_size, self.cfg.zero_stage, self.cfg.precision)
        own = self._rank if self._rank < layout["world_size"] else 0
        if same:
            # DeepSpeed reads its files with torch.load(weights_only=False): they hold pickled optimizer state
            # and config objects. Only files this project's runs wrote into the run directory are read here.
            path, _ = self._ds.load_checkpoint(str(src), tag=_DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load its state from {src / _DS_TAG}")
            ema_rank = self._rank if self.cfg.zero_stage == 3 else 0
            self._restore_ema(load_file(str(src / f"rank{ema_rank:05d}.safetensors")), layout)
        else:
            if self.is_main:
                log.warning("checkpoint %s was written by ZeRO-%d, %s, %d process(es); this run is ZeRO-%d, %s, %d "
                            "process(es). DeepSpeed cannot re-shard its optimizer state, so only the weights%s and "
                            "the schedule position are restored: AdamW moments restart from zero",
                            src, layout["zero_stage"], layout["precision"], layout["world_size"],
                            self.cfg.zero_stage, self.cfg.precision, self._world_size,
                            " and EMA" if fallback_ema is not None else "")
            if fallback_weights is None:
                raise ValueError(f"{src} holds a different layout; pass fallback_weights=<model.safetensors>")
            self._load_whole_weights(Path(fallback_weights))
            self._set_schedule_position(int(layout["optimizer_steps"]))
            self._ds.global_steps = int(layout["global_steps"])
            self._restore_ema(None, layout, fallback_ema)
        self._skipped_steps = int(layout["skipped_steps"])
        if own != self._rank:
            log.warning("rank %d did not exist when %s was saved: it keeps its seeded RNG and takes rank 0's "
                        "client_state", self._rank, src)
        saved = json.loads((src / f"rank{own:05d}.json").read_text())
        tensors = load_file(str(src / f"rank{own:05d}.safetensors"))
        if own == self._rank:
            _restore_rng(saved["rng"], tensors)
        return _decode_state(saved["client_state"], tensors)

    def _set_schedule_position(self, steps: int) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        scheduler.last_epoch = steps
        lrs = [base * fn(steps) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
