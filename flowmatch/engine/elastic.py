"""The optimizer state in a form that does not depend on the layout: whole fp32 tensors keyed by parameter name.

A run's AdamW state lives in pieces whose shape depends on the ZeRO stage and the world size: without ZeRO every
rank holds each parameter's fp32 master and moments whole; under ZeRO-1/2 each rank holds one flat fp32 partition
per param group, cut across parameter boundaries; under ZeRO-3 one flat partition per sub-group, made of every
parameter's own equal slice (the last one zero-padded). :meth:`ElasticState.save` writes, beside the per-rank
files of the layout-matched fast path (:mod:`.state`), every trainable parameter's whole fp32 master, ``exp_avg``
and ``exp_avg_sq`` (flat, 1-D) and AdamW step count, in ``optim-full-<rank>.safetensors`` files, and an index
``optim-full.json`` (shapes, which file holds each parameter, param-group hyper-parameters, LR schedule, loss
scale). :meth:`ElasticState.load` lets every rank of any layout read exactly its own pieces of them.

Streaming: parameters are dealt to ranks in contiguous runs of about equal size; each parameter's pieces are
summed onto its owner alone (the pieces are disjoint, so the sum is a bit-exact concatenation) and written at once
into the owner's file, whose safetensors header was written first from the known shapes. No rank ever holds more
than one whole parameter it does not own. On load each rank reads only the byte ranges of its own pieces.

Why by hand: DeepSpeed's ``ds_to_universal`` / ``load_universal_checkpoint`` read and write ``torch.save``
pickles (which a resume here never loads), ``zero_to_fp32`` recovers the weights only, and its fragment helpers
(``safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``) all-reduce every parameter to every rank,
need the AdamW state to exist already (it is created lazily at the first step) and, under ZeRO-3, cannot set a
parameter whose size the world size does not divide (``set_full_hp_param`` narrows past the unpadded tensor). The
piece addresses below are the ones those helpers read (``_hp_mapping``, ``grad_position``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.trainable import Trainable

ELASTIC_INDEX = "optim-full.json"
_FILE = "optim-full-{rank:05d}.safetensors"
_ROWS = ("master", "exp_avg", "exp_avg_sq")
_FORMAT = 1
# The optimizer whose state these files hold (``optim.name``): the rows above are AdamW's.
_OPTIMIZER = "adamw"


class ElasticStateError(ValueError):
    """The layout-independent optimizer state is missing, damaged or does not fit this model."""


@dataclass(frozen=True)
class Piece:
    """This rank's piece of one parameter's fp32 optimizer state.

    Attributes:
        master: the fp32 tensor AdamW updates (a key of ``optimizer.state``): the parameter itself, the bf16
            wrapper's copy of it, or a flat ZeRO partition.
        hp_start: where the piece starts in ``master`` (flattened).
        lp_start: where it starts in the whole parameter (flattened).
        numel: its number of elements.
    """

    master: torch.Tensor
    hp_start: int
    lp_start: int
    numel: int


def pieces(trainable: Trainable, rank: int) -> list[Piece | None]:
    """This rank's :class:`Piece` of each of ``trainable.named_params`` (None where it holds none)."""
    wrapper, stage = trainable.deepspeed_optimizer, trainable.zero_stage
    params = [p for _, p in trainable.named_params]
    if stage == 0:
        if wrapper is trainable.optimizer:  # fp32: each parameter is its own master
            return [Piece(p, 0, 0, p.numel()) for p in params]
        # The bf16/fp16 wrapper keeps one fp32 copy per parameter, group by group.
        copies = {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)}
        return [Piece(copies[id(p)], 0, 0, p.numel()) for p in params]
    out: list[Piece | None] = []
    if stage in (1, 2):
        for p in params:
            m = getattr(p, "_hp_mapping", None)
            out.append(None if m is None else Piece(wrapper.single_partition_of_fp32_groups[m.param_group_index],
                                                    m.hp_fragment_address.start, m.lp_fragment_address.start,
                                                    m.lp_fragment_address.numel))
        return out
    for p in params:  # ZeRO-3: rank r holds elements [r * size, (r + 1) * size) of every parameter
        group_idx, offset, size = wrapper.grad_position[wrapper.get_param_id(p)]
        start = rank * size
        numel = max(0, min(size, p.ds_numel - start))
        out.append(Piece(wrapper.fp32_partitioned_groups_flat[group_idx], offset, start, numel) if numel else None)
    return out


def _owners(numels: list[int], world: int) -> list[int]:
    """Deal parameters to ranks in contiguous runs of about equal total size."""
    total, seen, out = max(1, sum(numels)), 0, []
    for n in numels:
        out.append(min(world - 1, seen * world // total))
        seen += n
    return out


class _StreamedSafetensors:
    """A safetensors file of fp32 tensors written one tensor at a time: the header first, from the shapes."""

    def __init__(self, path: Path, entries: list[tuple[str, int]], metadata: Mapping[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for key, numel in entries:
            header[key] = {"dtype": "F32", "shape": [numel], "data_offsets": [offset, offset + 4 * numel]}
            offset += 4 * numel
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self._order = [key for key, _ in entries]
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (fp32, CPU), which must be the next entry of the header."""
        expected = self._order.pop(0)
        assert key == expected, (key, expected)
        self._f.write(tensor.contiguous().numpy().tobytes())

    def close(self) -> None:
        self._f.close()


@dataclass
class _Loaded:
    """What one rank read for :meth:`ElasticState.load`, applied only once every rank has read its part."""

    masters: dict[int, torch.Tensor]
    state: dict[int, dict[str, torch.Tensor]]
    info: dict[str, Any]


class ElasticState:
    """Saving and loading the layout-independent optimizer state of a run.

    Args:
        group: the process group.
        trainable: the wrapped model with its optimizer and schedule.
    """

    def __init__(self, group: ProcessGroup, trainable: Trainable) -> None:
        self._group, self._trainable = group, trainable

    def _row_tensors(self, piece: Piece | None, opt: torch.optim.Optimizer) -> Iterator[torch.Tensor | None]:
        state = opt.state.get(piece.master, {}) if piece is not None else {}
        yield None if piece is None else piece.master
        for key in _ROWS[1:]:
            yield state.get(key)

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Collective: write this rank's share of the whole optimizer state into ``directory``; returns its files.

        Only AdamW's state is written: the other optimizers' state (8-bit blocks cut at partition boundaries,
        factored moments) has no whole-tensor form to re-shard, so nothing is written and a resume on another
        layout restarts their state from zero, saying why (:meth:`load`)."""
        group, trainable = self._group, self._trainable
        if trainable.optimizer_name != _OPTIMIZER:
            return []
        rank, world = group.rank, group.world_size
        named = trainable.named_params
        mine = pieces(trainable, rank)
        numels = [math.prod(trainable_shape(p)) for _, p in named]
        owners = _owners(numels, world)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        partitioned = trainable.partitions_optimizer
        with trainable.optimizer_with_masters() as opt:
            steps = torch.zeros(len(named), dtype=torch.float64, device=group.device)
            for i, piece in enumerate(mine):
                state = opt.state.get(piece.master, {}) if piece is not None else {}
                if "step" in state:
                    steps[i] = float(state["step"])
            if partitioned:  # ranks holding no piece of a parameter contribute 0
                steps = -group.all_reduce_min(-steps)
            steps_list = [int(s) for s in steps.tolist()]
            path = out / _FILE.format(rank=rank)
            entries = [(f"{name}/{row}", n) for (name, _), n, o in zip(named, numels, owners) if o == rank
                       for row in _ROWS]
            writer = _StreamedSafetensors(path, entries, {"format": str(_FORMAT)})
            try:
                for (name, _), piece, n, owner in zip(named, mine, numels, owners):
                    if not partitioned and owner != rank:
                        continue  # without ZeRO every rank holds every parameter whole: its owner alone reads it
                    rows = torch.zeros(len(_ROWS), n, dtype=torch.float32, device=group.device)
                    if piece is not None:
                        for row, source in zip(rows, self._row_tensors(piece, opt)):
                            if source is not None:
                                part = source.detach().reshape(-1)[piece.hp_start:piece.hp_start + piece.numel]
                                row[piece.lp_start:piece.lp_start + piece.numel] = part.to(row.device, row.dtype)
                    if partitioned:  # disjoint pieces: the sum is an exact concatenation
                        rows = group.reduce_sum_to(rows, owner)
                    if owner == rank:
                        for key, row in zip(_ROWS, rows.cpu()):
                            writer.write(f"{name}/{key}", row)
                    del rows
            finally:
                writer.close()
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        written = [path]
        if group.is_main:
            index = {"format": _FORMAT, "world_size": world, "zero_stage": trainable.zero_stage,
                     "params": {name: {"shape": list(trainable_shape(p)), "file": _FILE.format(rank=o), "step": s}
                                for (name, p), o, s in zip(named, owners, steps_list)},
                     "param_groups": hyper, **trainable.schedule_state()}
            index_path = out / ELASTIC_INDEX
            index_path.write_text(json.dumps(index, indent=1))
            written.append(index_path)
        return written

    def _read(self, src: Path) -> _Loaded:
        """This rank's pieces of the saved state (reads only their bytes); raises ElasticStateError."""
        trainable = self._trainable
        index_path = src / ELASTIC_INDEX
        if not index_path.is_file():
            raise ElasticStateError(f"{index_path} is missing")
        try:
            info = json.loads(index_path.read_text())
            saved = info["params"]
        except (ValueError, KeyError, TypeError) as err:
            raise ElasticStateError(f"{index_path} is damaged ({err})") from err
        named = trainable.named_params
        missing = [n for n, _ in named if n not in saved]
        if missing or len(saved) != len(named):
            raise ElasticStateError(f"{index_path} does not fit this model: {len(saved)} saved parameter(s), "
                                    f"{len(named)} here, missing e.g. {missing[:3]}")
        masters: dict[int, torch.Tensor] = {}
        state: dict[int, dict[str, torch.Tensor]] = {}
        handles: dict[str, Any] = {}
        with trainable.optimizer_with_masters() as opt:
            index_of = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
            try:
                for (name, p), piece in zip(named, pieces(trainable, self._group.rank)):
                    entry = saved[name]
                    if tuple(entry["shape"]) != trainable_shape(p):
                        raise ElasticStateError(f"{name} was saved with shape {tuple(entry['shape'])}, this model "
                                                f"has {trainable_shape(p)}")
                    if piece is None:
                        continue
                    if entry["file"] not in handles:
                        handles[entry["file"]] = safe_open(str(src / entry["file"]), framework="pt")
                    f, i = handles[entry["file"]], index_of[id(piece.master)]
                    lo, hi = piece.lp_start, piece.lp_start + piece.numel
                    rows = {row: f.get_slice(f"{name}/{row}")[lo:hi] for row in _ROWS}
                    master = masters.setdefault(i, piece.master.detach().reshape(-1).clone())
                    master[piece.hp_start:piece.hp_start + piece.numel] = rows["master"]
                    if entry["step"] > 0:
                        own = state.setdefault(i, {"step": torch.tensor(0.0),
                                                   **{k: torch.zeros_like(master) for k in _ROWS[1:]}})
                        # One step count per master tensor; its parameters' counts agree unless some went
                        # without gradients in a run without ZeRO (then the most-updated one's count is kept).
                        own["step"] = torch.tensor(max(float(entry["step"]), float(own["step"])))
                        for key in _ROWS[1:]:
                            own[key][piece.hp_start:piece.hp_start + piece.numel] = rows[key]
            except ElasticStateError:
                raise
            except (OSError, KeyError, ValueError, SafetensorError) as err:
                raise ElasticStateError(f"the optimizer files in {src} are missing or damaged ({err})") from err
        return _Loaded(masters, state, info)

    def load(self, directory: str | os.PathLike[str]) -> str | None:
        """Collective: give every rank its pieces of the state :meth:`save` wrote, at any layout; call after the
        working weights are restored. Returns None, or (on every rank, with nothing changed) why it could not."""
        loaded: _Loaded | None = None
        reason = ""
        if self._trainable.optimizer_name != _OPTIMIZER:
            return (f"optim.name {self._trainable.optimizer_name} keeps a state whose layout follows the ZeRO "
                    "partitions (only adamw's is saved as whole tensors), so it cannot move to another layout")
        try:
            loaded = self._read(Path(directory))
        except ElasticStateError as err:
            reason = str(err)
        ok = self._group.all_reduce_min(torch.tensor([1.0 if loaded else 0.0], device=self._group.device))
        if not bool(ok.item() > 0):
            reasons = [r for r in self._group.all_gather_object(reason) if r]
            return reasons[0]
        assert loaded is not None
        trainable = self._trainable
        with trainable.optimizer_with_masters() as opt:
            flat = [p for g in opt.param_groups for p in g["params"]]
            with torch.no_grad():
                for i, values in loaded.masters.items():
                    flat[i].view(-1).copy_(values.to(flat[i].device))
            state = {i: {k: v.view_as(flat[i]).to(flat[i].device) if v.dim() else v for k, v in s.items()}
                     for i, s in loaded.state.items()}
            trainable.load_into(opt, state, loaded.info["param_groups"])
        trainable.load_schedule_state(loaded.info)
        return None


def trainable_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The whole shape of a trainable parameter (its ``ds_shape`` under ZeRO-3)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def read_full_state(directory: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The whole optimizer state saved in ``directory``: {parameter name: {master, exp_avg, exp_avg_sq (shaped),
    step (0-dim)}}, for inspection and comparison. Reads every file whole."""
    src = Path(directory)
    info = json.loads((src / ELASTIC_INDEX).read_text())
    out: dict[str, dict[str, torch.Tensor]] = {}
    handles: dict[str, Any] = {}
    for name, entry in info["params"].items():
        if entry["file"] not in handles:
            handles[entry["file"]] = safe_open(str(src / entry["file"]), framework="pt")
        f = handles[entry["file"]]
        out[name] = {row: f.get_tensor(f"{name}/{row}").view(entry["shape"]) for row in _ROWS}
        out[name]["step"] = torch.tensor(entry["step"])
    return out
