"""A LoRA file in any of a family's formats, read back as flowmatch's adapters (``model.lora.init_from``).

The format is the one of the family's (:mod:`flowmatch.models.convert.lora_formats`) whose module names the
file's keys use. Every key must land: a key that names no adapted module, a factor of another adapter kind, or an
adapted module the file does not hold is an error that counts them and names examples, never a partial load.

Each module's scale alpha / rank (its ``.alpha`` tensor, else diffusers' peft header, else 1 as diffusers assumes)
is folded into B so the update equals the file's under the recipe's ``model.lora`` scale. A module whose factors
are all zero changes nothing and is dropped (formats whose readers need every block's modules pad with them).
Modules that ours fuse (diffusers' separate Q, K, V; FLUX's Q, K, V and MLP input) become one adapter: with the
same A (as flowmatch and diffusers' kohya converter write them) B is stacked; with different A's, A is stacked and
B block-diagonal (rank the sum). An adapter of a smaller rank than the recipe's is padded with zero rows of A and
zero columns of B, which leave the update unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from flowmatch.models.convert.keymap import Copy, Packed, Stack, SwapHalves, Tail
from flowmatch.models.convert.lora import METADATA_KEY
from flowmatch.models.convert.lora_formats import LoraFormat, Placement, module_index, placements, split_key
from flowmatch.models.lora import LoraConfig, Projection, adapter_key

#: How many example keys an error names.
EXAMPLES = 4


def read_lora_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors in float32, safetensors metadata) of a LoRA file; ValueError for anything but safetensors (a
    pickle from elsewhere could run code: it is never loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist (give the path of a .safetensors LoRA file)")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {path}: only .safetensors files are read (a {path.suffix or 'suffix-less'} "
                         "file may be a pickle, which can run code); convert it to safetensors first")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"LoRA file {path} is not a readable safetensors file ({err}): it may be truncated; "
                         "download or export it again") from None


def _examples(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:EXAMPLES]) + (", ..." if len(keys) > EXAMPLES else "")


def detect(tensors: Mapping[str, Tensor], formats: Mapping[str, LoraFormat], cfg,
           ) -> tuple[LoraFormat, dict[str, tuple[Placement, int]]]:
    """The format whose module names the most of the file's keys use, and its module index; ValueError when none
    names any."""
    modules = {parsed[0] for k in tensors if (parsed := split_key(k)) is not None}
    best, best_index, best_hits = None, {}, 0
    for fmt in formats.values():
        index = module_index(fmt, placements(fmt, cfg))
        hits = len(modules & index.keys())
        if hits > best_hits:
            best, best_index, best_hits = fmt, index, hits
    if best is None:
        raise ValueError(f"none of the file's {len(tensors)} keys names a module of this model in any LoRA format "
                         f"of its family ({', '.join(formats)}); e.g. {_examples(tensors)}")
    return best, best_index


def _alphas(metadata: Mapping[str, str], fmt: LoraFormat) -> tuple[Optional[float], dict[str, float]]:
    """(lora_alpha, alpha_pattern) of diffusers' peft header for the format's prefix, (None, {}) without one."""
    if METADATA_KEY not in metadata:
        return None, {}
    header = json.loads(metadata[METADATA_KEY])
    lead = f"{fmt.prefix}." if fmt.prefix else ""
    return header.get(f"{lead}lora_alpha"), dict(header.get(f"{lead}alpha_pattern") or {})


def _fuse(place: Placement, parts: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Our (A, B) from the file's (A, B) of each of the placement's modules (by position; B already scaled)."""
    op = place.op
    if isinstance(op, Stack):
        a0 = next(iter(parts.values()))[0]
        shared = all(a.shape == a0.shape and torch.equal(a, a0) for a, _ in parts.values())
        if shared:
            rows = [parts[i][1] if i in parts else a0.new_zeros(size, a0.shape[0])
                    for i, size in enumerate(op.sizes)]
            return a0, torch.cat(rows)
        a = torch.cat([parts[i][0] for i in sorted(parts)])
        b = a.new_zeros(sum(op.sizes), a.shape[0])
        row, col = 0, 0
        for i, size in enumerate(op.sizes):
            if i in parts:
                r = parts[i][0].shape[0]
                b[row:row + size, col:col + r] = parts[i][1]
                col += r
            row += size
        return a, b
    a, b = parts[0]
    if isinstance(op, Tail):  # the rows ahead of ours never reach an output
        return a, b[op.head:]
    if isinstance(op, SwapHalves) or (isinstance(op, Packed) and op.axis == 0):
        return a, op.to_ours([b])
    if isinstance(op, Packed) and op.axis == 1:
        return op.to_ours([a]), b
    if type(op) is Copy:
        return a, b
    raise ValueError(f"no LoRA conversion for {place.ours} ({type(op).__name__})")


@dataclass
class FileAdapters:
    """A LoRA file's adapters on our modules: what :func:`file_adapters` reads."""

    format: str
    """The name of the family's format the file uses."""
    adapters: dict[str, tuple[Tensor, Tensor]]
    """Our module -> (A (r, in), B (out, r)) with the file's scale alpha / r over :attr:`scale` folded into B (the
    update is scale B A)."""
    theirs: dict[str, str]
    """Our module -> the file's name of (the first of) its module(s), for messages."""
    scale: float
    """The scale alpha / rank the adapters are meant for (B holds the rest)."""

    def fit(self, chosen: list[Projection], lora: LoraConfig, *, what: str = "the LoRA file") -> dict[str, Tensor]:
        """Our adapter tensors keyed as the model's state dict for the adapters ``chosen`` at the recipe's ``lora``
        rank and scale; ValueError when the file's modules are not exactly the chosen ones or need a larger rank."""
        if lora.scale != self.scale:
            raise ValueError(f"adapters read for scale {self.scale:g} cannot be fitted at scale {lora.scale:g}")
        wanted = {p.ours for p in chosen}
        extra = sorted(self.theirs[o] for o in self.adapters.keys() - wanted)
        if extra:
            raise ValueError(f"{what} adapts {len(extra)} modules that model.lora.targets leaves out, e.g. "
                             f"{_examples(extra)}: add them to model.lora.targets (or leave it null for the family's "
                             "defaults if they are among them)")
        uncovered = sorted(wanted - self.adapters.keys())
        if uncovered:
            raise ValueError(f"{what} holds no adapter for {len(uncovered)} of the {len(wanted)} modules "
                             f"model.lora.targets adapts (flowmatch names), e.g. {_examples(uncovered)}: set "
                             "model.lora.targets to the file's modules")
        out: dict[str, Tensor] = {}
        for ours, (a, b) in self.adapters.items():
            if a.shape[0] > lora.rank:
                raise ValueError(f"{what}: {self.theirs[ours]} needs rank {a.shape[0]} here (its modules fused into "
                                 f"flowmatch's {ours}), more than model.lora.rank = {lora.rank}: set "
                                 f"model.lora.rank: {a.shape[0]} or more")
            pad = lora.rank - a.shape[0]
            out[adapter_key(ours, "A")] = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            out[adapter_key(ours, "B")] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        return out

    @property
    def rank(self) -> int:
        """The largest rank of the adapters on our modules."""
        return max(a.shape[0] for a, _ in self.adapters.values())


def group(tensors: Mapping[str, Tensor], index: Mapping[str, tuple[Placement, int]], fmt: LoraFormat, what: str,
          ) -> tuple[dict[str, dict[int, dict[str, Tensor]]], dict[str, Placement]]:
    """The file's factors by our module and position among its placement's modules (``{ours: {i: {factor:
    tensor}}}``, factors named as :data:`~flowmatch.models.convert.lora_formats.FACTOR_NAMES` keys them), and
    each module's placement; ValueError counting and naming the keys that name no module of the model."""
    grouped: dict[str, dict[int, dict[str, Tensor]]] = {}
    places: dict[str, Placement] = {}
    unmatched = []
    for key, value in tensors.items():
        parsed = split_key(key)
        if parsed is None or parsed[0] not in index:
            unmatched.append(key)
            continue
        module, _, factor = parsed
        place, i = index[module]
        places[place.ours] = place
        grouped.setdefault(place.ours, {}).setdefault(i, {})[factor] = value
    if unmatched:
        modules = {parsed[0] if (parsed := split_key(k)) else k for k in unmatched}
        raise ValueError(f"{what} ({fmt.name} format): {len(unmatched)} of its {len(tensors)} keys match no module "
                         f"of this model ({len(modules)} modules, e.g. {_examples(modules)}); it is not loaded in "
                         "part: use a LoRA made for this model (family and size)")
    return grouped, places


def file_adapters(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], formats: Mapping[str, LoraFormat],
                  cfg, *, scale: float = 1.0, what: str = "the LoRA file") -> FileAdapters:
    """A LoRA file's tensors as adapters on the modules of the model ``cfg`` describes, in whichever of
    ``formats`` the file uses, for the adapter scale ``scale`` (alpha / rank of the model's LoRA: the file's own
    scale over it multiplies B; 1 when equal). ValueError naming counts and examples of every key that does not
    land (``what`` names the file)."""
    fmt, index = detect(tensors, formats, cfg)
    grouped, places = group(tensors, index, fmt, what)
    other_kind = sorted(f"{fmt.module_key(places[o].theirs[i])}.{factor}" for o, parts in grouped.items()
                        for i, factors in parts.items() for factor in factors if factor not in ("A", "B", "alpha"))
    if other_kind:
        raise ValueError(f"{what}: {len(other_kind)} keys hold another adapter kind than LoRA, e.g. "
                         f"{_examples(other_kind)}: set model.lora.kind to the file's kind")
    lora_alpha, pattern = _alphas(metadata, fmt)
    adapters = {}
    for ours, parts in grouped.items():
        place = places[ours]
        scaled = {}
        for i, factors in parts.items():
            name = place.theirs[i]
            if "A" not in factors or "B" not in factors:
                missing = "A (down)" if "A" not in factors else "B (up)"
                raise ValueError(f"{what}: {fmt.module_key(name)} has no {missing} factor")
            a, b = factors["A"], factors["B"]
            rank = a.shape[0]
            alpha = factors["alpha"].item() if "alpha" in factors else pattern.get(name, lora_alpha or rank)
            scaled[i] = (a, b * (alpha / rank / scale))
        if any(a.any() or b.any() for a, b in scaled.values()):  # all-zero factors change nothing: dropped
            adapters[ours] = _fuse(place, scaled)
    return FileAdapters(fmt.name, adapters, {o: fmt.module_key(p.theirs[0]) for o, p in places.items()}, scale)
