"""Adapter files of the other kinds (DoRA, LoHa, LoKr) read back as flowmatch's adapters (``model.lora.init_from``
with ``model.lora.kind`` dora, loha or lokr); LoRA's own are :mod:`.lora_read`'s.

The file is in any of the family's formats (:mod:`flowmatch.models.convert.lora_formats`): peft's keys under
diffusers' module names (what ``flowmatch export --lora`` writes for these kinds, the peft header holding rank and
alpha), or LyCORIS' keys (``hada_w1_a``, ``lokr_w1``, ... with an ``alpha`` tensor per module) in the ComfyUI and
kohya layouts. Modules that ours fuse are joined as :mod:`.adapters` split them: factors on the output side
(B, DoRA's magnitude, LoHa's ``hada_w*_a``, LoKr's outer ``lokr_w1``) are stacked, swapped or permuted as the
weight's rows; the others must be the same in every part (a LoHa or LoKr of separate q, k, v with their own input
factors has no single adapter on the fused projection: an error says so).

Each module's scale (the file's over the recipe's) is folded into one output-side factor, so the update is the
file's. Unlike LoRA, a factor is never padded: the file's shapes must be the model's (``model.lora.rank`` and, for
LoKr, ``model.lora.factor``); an error names the module and both shapes. As for LoRA, every key must land and every
adapted module must be in the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

from flowmatch.models.convert.keymap import Copy, Packed, Stack, SwapHalves, Tail
from flowmatch.models.convert.lora import METADATA_KEY
from flowmatch.models.convert.lora_formats import FACTOR_NAMES, LoraFormat, Placement
from flowmatch.models.convert.lora_read import _examples, detect, group
from flowmatch.models.lora import ADAPTER, LoraConfig, Projection

#: Our (peft's) name of each file factor, per kind; the factors that lie on the weight's output side.
PEFT_NAMES = {"A": "lora_A", "B": "lora_B"}
ROWS = {"B", "lora_magnitude_vector", "hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w1_a"}
#: The factors that tell each kind (a DoRA file holds LoRA's A and B besides its magnitude).
KIND_OF = {factor: kind for kind, styles in FACTOR_NAMES.items() for factor in styles["peft"]
           if factor not in FACTOR_NAMES["lora"]["peft"]}
#: The factor each kind's scale is folded into.
SCALED = {"dora": "B", "loha": "hada_w1_a", "lokr": "lokr_w2"}


def file_kind(factors) -> str:
    """The adapter kind whose factors these are (lora when none tells another)."""
    kinds = {KIND_OF[f] for f in factors if f in KIND_OF}
    return kinds.pop() if len(kinds) == 1 else "lora" if not kinds else "mixed"


def _peft_key(ours: str, factor: str) -> str:
    """Our model's state-dict name of a factor (peft's: LoRA's and DoRA's end in ``.weight``)."""
    name = PEFT_NAMES.get(factor, factor)
    return f"{ours}.{name}.{ADAPTER}" + (".weight" if name in ("lora_A", "lora_B", "lora_magnitude_vector") else "")


def _file_scale(kind: str, factors: Mapping[str, Tensor], header: Mapping[str, object], name: str) -> float:
    """The scale the file means for one module: LyCORIS' (alpha over the decomposed rank, 1 for a LoKr of two
    whole factors) with an alpha tensor, else the peft header's lora_alpha / r (alpha_pattern per module)."""
    if "alpha" in factors:
        alpha = factors["alpha"].item()
        if kind == "lokr":
            inner = factors.get("lokr_w1_b", factors.get("lokr_w2_b"))
            return 1.0 if inner is None else alpha / inner.shape[0]
        rank = (factors["A"] if kind == "dora" else factors["hada_w1_b"]).shape[0]
        return alpha / rank
    rank = (dict(header.get("rank_pattern") or {})).get(name, header.get("r", 1))
    alpha = (dict(header.get("alpha_pattern") or {})).get(name, header.get("lora_alpha", header.get("alpha", rank)))
    return alpha / rank


def _join(place: Placement, factor: str, parts: list[Tensor], block: int, what: str) -> Tensor:
    """Our factor from the file's factor of each of the placement's modules (in order); ``block`` is a LoKr's
    rows of w2 (the weight rows one outer row spans)."""
    op = place.op
    if factor in ("lokr_w1", "lokr_w1_a"):  # outer rows: whole blocks of the weight's rows
        if isinstance(op, Tail):
            return parts[0][op.head // block:]
        if isinstance(op, Stack) or type(op) is Copy:
            return torch.cat(parts)
        raise ValueError(f"{what}: a LoKr on {', '.join(place.theirs)} has no Kronecker form on flowmatch's "
                         f"{place.ours} ({type(op).__name__} of its rows): train with model.lora.kind lora")
    if factor in ROWS:
        if isinstance(op, (Stack, SwapHalves, Tail)) or (isinstance(op, Packed) and op.axis == 0):
            return op.to_ours(parts)
        if type(op) is Copy:
            return parts[0]
    if isinstance(op, Packed) and op.axis == 1 and factor in ("A", "hada_w1_b", "hada_w2_b"):
        return op.to_ours(parts[:1])
    if all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts[1:]):
        return parts[0]
    raise ValueError(f"{what}: the {factor} factors of {', '.join(place.theirs)} differ; flowmatch adapts them as "
                     f"one projection ({place.ours}), which one adapter of this kind cannot express: train with "
                     "model.lora.kind lora, or start from a file whose modules share their input factors")


def read_adapters(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], formats: Mapping[str, LoraFormat],
                  cfg, lora: LoraConfig, *, what: str = "the adapter file") -> tuple[str, dict[str, Tensor]]:
    """(format name, our adapter tensors keyed as the model's state dict) of a DoRA, LoHa or LoKr file for the
    model ``cfg`` describes with adapters ``lora`` (its kind, rank and scale). ValueError naming counts and
    examples of keys that do not land, a file of another kind, modules split with their own input factors."""
    fmt, index = detect(tensors, formats, cfg)
    grouped, places = group(tensors, index, fmt, what)
    kinds = {file_kind(f for parts in grouped.values() for fs in parts.values() for f in fs)}
    if kinds != {lora.kind}:
        raise ValueError(f"{what} holds {kinds.pop()} adapters, model.lora.kind is {lora.kind}: set model.lora.kind "
                         "to the file's kind")
    header = {}
    if METADATA_KEY in metadata:
        lead = f"{fmt.prefix}." if fmt.prefix else ""
        header = {k[len(lead):]: v for k, v in json.loads(metadata[METADATA_KEY]).items() if k.startswith(lead)}
    out: dict[str, Tensor] = {}
    for ours, parts in grouped.items():
        place = places[ours]
        absent = [fmt.module_key(t) for i, t in enumerate(place.theirs) if i not in parts]
        if absent:
            raise ValueError(f"{what}: {', '.join(absent)} has no adapter while the other modules flowmatch fuses "
                             f"with it into {ours} do: a {lora.kind} adapter cannot cover part of a projection")
        factors = {f for fs in parts.values() for f in fs} - {"alpha"}
        for i, fs in parts.items():
            if factors - fs.keys():
                raise ValueError(f"{what}: {fmt.module_key(place.theirs[i])} has no "
                                 f"{', '.join(sorted(factors - fs.keys()))} factor")
        inner = parts[0].get("lokr_w2", parts[0].get("lokr_w2_a"))
        block = inner.shape[0] if inner is not None else 1
        for f in sorted(factors):
            joined = _join(place, f, [parts[i][f] for i in range(len(place.theirs))], block, what)
            if f == SCALED[lora.kind] or (f == "lokr_w2_a" and "lokr_w2" not in factors):
                joined = joined * (_file_scale(lora.kind, parts[0], header, place.theirs[0]) / lora.scale)
            out[_peft_key(ours, f)] = joined
    return fmt.name, out


def fit(found: Mapping[str, Tensor], model_params: Mapping[str, Tensor], chosen: list[Projection], what: str,
        ) -> dict[str, Tensor]:
    """``found`` checked against the model's adapter parameters: the same modules as ``chosen`` and the same shapes;
    ValueError naming what differs."""
    wanted = {p.ours for p in chosen}
    have = {k for k in model_params if any(k.startswith(f"{o}.") for o in wanted) and f".{ADAPTER}" in k}
    extra, missing = sorted(found.keys() - have), sorted(have - found.keys())
    if extra:
        raise ValueError(f"{what} holds {len(extra)} adapter factors the model's model.lora.targets leave out or "
                         f"its kind does not have, e.g. {_examples(extra)}: set model.lora.targets to the file's "
                         "modules")
    if missing:
        raise ValueError(f"{what} holds no factor for {len(missing)} of the model's adapter parameters, e.g. "
                         f"{_examples(missing)}: set model.lora.targets to the file's modules")
    wrong = [f"{k} {tuple(found[k].shape)} in the file, {tuple(model_params[k].shape)} in the model"
             for k in sorted(found) if found[k].shape != model_params[k].shape]
    if wrong:
        raise ValueError(f"{what}: {len(wrong)} factors differ in shape, e.g. {wrong[0]}: set model.lora.rank (and "
                         "for lokr model.lora.factor) to the file's")
    return dict(found)
