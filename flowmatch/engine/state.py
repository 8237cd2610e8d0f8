"""The engine's full training state on disk (:meth:`Engine.save` and :meth:`Engine.load`), and ``engine.json``.

Nothing is pickled, and nothing is unpickled on load. Each rank writes ``rank<NNNNN>.json`` and
``rank<NNNNN>.safetensors``: its ``client_state`` (JSON, its tensors in safetensors), its python, numpy and torch
RNG states, and its part of the optimizer state (:meth:`Trainable.optimizer_state`): AdamW moments and steps of
its ZeRO partition, the fp32 masters where they differ from the working weights (bf16/fp16), the param groups,
LR schedule and loss scale as JSON; under ZeRO-3 also its EMA partition. Without ZeRO every rank holds the same
optimizer state, and rank 0 alone writes it. These are read back by a run of the same layout (the fast path);
a run of any other layout reads the same optimizer state from its whole tensors, written beside them
(``optim-full*``, :mod:`.elastic`). What the consolidated files of a checkpoint hold already is not
repeated: the working weights come from ``model.safetensors`` and, below ZeRO-3, the EMA from
``ema.safetensors``, both passed to :meth:`TrainingState.load`. DeepSpeed's own ``save_checkpoint`` /
``load_checkpoint`` are not used, since they write and read ``torch.save`` pickles.

``engine.json`` (:class:`EngineMeta`) is the one record of the distributed layout that wrote a state (world size,
ZeRO stage, precision); read it with :func:`read_engine_meta`. States of format 1 hold DeepSpeed's pickled
optimizer files instead, which are never read: they resume like a checkpoint of another layout.

Files are written as whole byte strings with plain Python I/O, so a full disk raises ``OSError`` with its errno
(safetensors' own ``save_file`` reports it as a ``SafetensorError`` without one).
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
from safetensors.torch import load_file, save

from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.elastic import ElasticState
from flowmatch.engine.ema import Ema
from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.trainable import Trainable
from flowmatch.engine.zero import Zero

log = logging.getLogger(__name__)

ENGINE_META_FILE = "engine.json"
# 2: the optimizer state is safetensors + JSON written here; 1: DeepSpeed's pickled files under deepspeed/.
_STATE_FORMAT = 2
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


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` in the safetensors format; a full disk raises ``OSError`` (ENOSPC).

    The file is serialised in memory first (one extra copy of its bytes), then written with plain Python I/O.
    """
    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    with open(path, "wb") as f:
        f.write(data)
    return path


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


class _RankFiles:
    """The per-rank files of a saved state, each read at most once."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._json: dict[int, dict[str, Any]] = {}
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}

    def payload(self, rank: int) -> dict[str, Any]:
        if rank not in self._json:
            self._json[rank] = json.loads((self._dir / f"rank{rank:05d}.json").read_text())
        return self._json[rank]

    def tensors(self, rank: int) -> dict[str, torch.Tensor]:
        if rank not in self._tensors:
            self._tensors[rank] = load_file(str(self._dir / f"rank{rank:05d}.safetensors"))
        return self._tensors[rank]


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

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> list[Path]:
        """Collective: write the full training state of every rank (see :meth:`flowmatch.engine.Engine.save`);
        returns the files this rank wrote."""
        group, trainable = self._group, self._trainable
        if trainable.in_window:
            raise RuntimeError("Engine.save must be called between updates, not inside an accumulation window")
        tensors = {"rng.torch": torch.get_rng_state()}
        payload: dict[str, Any] = {"client_state": _encode_state(client_state, tensors), "rng": _rng_state_json()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i:03d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self._ema is not None and self._zero.partitioned:  # else the consolidated EMA file holds it whole
            tensors.update(self._ema.local_tensors())
        if trainable.partitions_optimizer or group.is_main:  # without ZeRO every rank holds the same state
            optim_tensors, payload["optimizer"] = trainable.optimizer_state()
            tensors.update(optim_tensors)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        own = out / f"rank{group.rank:05d}.json"
        own.write_text(json.dumps(payload))
        written = [own, write_safetensors(own.with_suffix(".safetensors"), tensors)]
        if self._cfg.elastic_checkpoints:
            written += ElasticState(group, trainable).save(out)
        if group.is_main:
            layout = out / ENGINE_META_FILE
            layout.write_text(json.dumps(asdict(self.meta()), indent=1))
            written.append(layout)
        group.barrier()
        return written

    def load(self, directory: str | os.PathLike[str], *, weights: str | os.PathLike[str],
             ema: str | os.PathLike[str] | None = None, elastic: bool = True) -> dict[str, Any]:
        """Collective: restore what :meth:`save` wrote (see :meth:`flowmatch.engine.Engine.load`)."""
        group, trainable, src = self._group, self._trainable, Path(directory)
        saved_meta = read_engine_meta(src)
        here = self.meta()
        same = (saved_meta.world_size, saved_meta.zero_stage, saved_meta.precision) == (
            here.world_size, here.zero_stage, here.precision)
        own = group.rank if group.rank < saved_meta.world_size else 0
        rank_files = _RankFiles(src)
        # Without ZeRO rank 0 wrote the one optimizer state every rank holds.
        optim_rank = group.rank if trainable.partitions_optimizer else 0
        optimizer = rank_files.payload(optim_rank).get("optimizer") if same and saved_meta.format >= 2 else None
        if same and saved_meta.format >= 2 and optimizer is None:
            raise ValueError(f"{src} has no optimizer state for rank {optim_rank}: the engine state is incomplete")
        # The working weights and buffers come from the consolidated file in every case.
        self._zero.load_whole(trainable.module, trainable.named_params, Path(weights))
        elastic_failure = None
        if optimizer is None and saved_meta.format < 2:
            elastic_failure = "it holds no optimizer state flowmatch reads"
        elif optimizer is None and not elastic:
            elastic_failure = "its optimizer state as whole tensors is damaged"
        elif optimizer is None:  # another layout: each rank takes its pieces of the whole tensors
            elastic_failure = ElasticState(group, trainable).load(src)
            if elastic_failure is None and group.is_main:
                log.warning("%s: the fp32 masters and AdamW moments were re-sharded from their whole tensors",
                            self._layout_change(src, saved_meta, here))
        if optimizer is not None:
            trainable.load_optimizer_state(rank_files.tensors(optim_rank), optimizer)
            trainable.restore_counts(skipped_steps=saved_meta.skipped_steps, global_steps=saved_meta.global_steps)
        elif elastic_failure is None:
            trainable.restore_counts(skipped_steps=saved_meta.skipped_steps, global_steps=saved_meta.global_steps)
        else:
            if group.is_main:
                log.warning("%s, and %s, so only the weights%s and the schedule position are restored: the fp32 "
                            "masters are taken from the weights and AdamW moments restart from zero (exp_avg, "
                            "exp_avg_sq and step reset)", self._partial_resume_reason(src, saved_meta, here, same),
                            elastic_failure, " and EMA" if ema is not None else "")
            trainable.refresh_masters()
            trainable.restore_counts(skipped_steps=saved_meta.skipped_steps,
                                     optimizer_steps=saved_meta.optimizer_steps, global_steps=saved_meta.global_steps)
        if self._ema is not None:
            self._restore_ema(rank_files, saved_meta, same, ema)
        if own != group.rank:
            log.warning("rank %d did not exist when %s was saved: it keeps its seeded RNG and takes rank 0's "
                        "client_state", group.rank, src)
        saved, tensors = rank_files.payload(own), rank_files.tensors(own)
        if own == group.rank:
            _restore_rng(saved["rng"], tensors)
        return _decode_state(saved["client_state"], tensors)

    @staticmethod
    def _layout_change(src: Path, saved: EngineMeta, here: EngineMeta) -> str:
        return (f"checkpoint {src} was written by ZeRO-{saved.zero_stage}, {saved.precision}, "
                f"{saved.world_size} process(es); this run is ZeRO-{here.zero_stage}, {here.precision}, "
                f"{here.world_size} process(es)")

    @classmethod
    def _partial_resume_reason(cls, src: Path, saved: EngineMeta, here: EngineMeta, same: bool) -> str:
        if not same:
            return f"{cls._layout_change(src, saved, here)}; its per-rank optimizer partitions do not fit this layout"
        return (f"checkpoint {src} was written by an earlier flowmatch that kept the optimizer state in DeepSpeed's "
                "pickled files, which are never loaded (unpickling a file can run code)")

    def _restore_ema(self, rank_files: _RankFiles, saved_meta: EngineMeta, same: bool,
                     whole: str | os.PathLike[str] | None) -> None:
        """Each rank's own partition under ZeRO-3 with the same layout (no gathering), else the consolidated file."""
        assert self._ema is not None
        updates = saved_meta.optimizer_steps if saved_meta.ema_updates is None else saved_meta.ema_updates
        if same and self._zero.partitioned and saved_meta.ema_decay is not None:
            self._ema.load_local(rank_files.tensors(self._group.rank), updates)
        elif whole is not None and Path(whole).is_file():
            self._ema.load_whole(load_file(str(whole)), updates)
        else:
            if self._group.is_main:
                log.warning("the checkpoint has no EMA: the EMA restarts from the loaded weights")
            self._ema.restart()
