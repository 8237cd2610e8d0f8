"""LoRA adapters of flowmatch's MMDiT as diffusers loads them, and merged into full weights.

diffusers' `load_lora_weights` (StableDiffusion3Pipeline, FluxPipeline) reads `pytorch_lora_weights.safetensors`
with peft keys `transformer.<diffusers module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), and the
safetensors header `lora_adapter_metadata`: the peft LoraConfig as JSON, each key prefixed `transformer.`, from
which it takes the rank and alpha (so the scale alpha / r is right when alpha != r) and the target modules.

Each adapter of ours is written per diffusers module by the converter's weight operation: the rows of B are
split, swapped or permuted exactly as the base weight's rows are; the columns of A as its columns are; so an
adapter on a fused projection (Q, K, V in one linear) becomes one adapter per diffusers module sharing A.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

from flowmatch.models.convert.keymap import Copy, Packed, Stack, SwapHalves, Tail
from flowmatch.models.convert.lora_formats import DIFFUSERS_PREFIX, LoraFormat, diffusers_format, placements
from flowmatch.models.lora import LoraConfig, Projection, adapter_key, linear_shapes, peft_config

#: The file name diffusers' `load_lora_weights` looks for.
LORA_FILE = "pytorch_lora_weights.safetensors"
#: The safetensors metadata key diffusers reads the LoraConfig from.
METADATA_KEY = "lora_adapter_metadata"
#: The pipeline component the adapters belong to.
PREFIX = DIFFUSERS_PREFIX
#: diffusers' layout. Families declare it with their diffusers key table
#: (``flowmatch/families/<family>/lora_formats.py``); here it writes projections that name diffusers' modules
#: already.
DIFFUSERS = diffusers_format(lambda cfg: [])


def adapted(adapters: Mapping[str, Tensor], chosen: list[Projection]) -> list[tuple[Projection, Tensor, Tensor]]:
    """(projection, A (r, in), B (out, r)) of every adapted projection; KeyError names a missing factor."""
    out = []
    for proj in chosen:
        a, b = adapters[adapter_key(proj.ours, "A")], adapters[adapter_key(proj.ours, "B")]
        out.append((proj, a, b))
    return out


def their_factors(proj, a: Tensor, b: Tensor) -> list[tuple[str, Tensor, Tensor]]:
    """(their module, A, B) for one adapter of ours; ``proj`` is a :class:`Projection` or a format's
    :class:`~flowmatch.models.convert.lora_formats.Placement` (our module, their modules, the key-table op)."""
    op = proj.op
    if isinstance(op, Stack):
        return [(name, a.clone(), part.clone()) for name, part in zip(proj.theirs, b.split(op.sizes, dim=0))]
    if isinstance(op, (SwapHalves,)) or (isinstance(op, Packed) and op.axis == 0):
        (b_theirs,) = op.to_theirs(b, None, b.dtype)
        return [(proj.theirs[0], a.clone(), b_theirs.contiguous())]
    if isinstance(op, Packed) and op.axis == 1:
        (a_theirs,) = op.to_theirs(a, None, a.dtype)
        return [(proj.theirs[0], a_theirs.contiguous(), b.clone())]
    if isinstance(op, Tail):  # their rows ahead of ours never reach an output: no update there
        return [(proj.theirs[0], a.clone(), torch.cat([b.new_zeros(op.head, b.shape[1]), b]))]
    if type(op) is Copy:
        return [(proj.theirs[0], a.clone(), b.clone())]
    raise ValueError(f"no LoRA conversion for {proj.ours} ({type(op).__name__})")


def peft_header(lora: LoraConfig, modules: list[str], prefix: str = PREFIX) -> dict[str, str]:
    """The safetensors metadata diffusers reads the LoraConfig from: peft's config adapting `modules`, each key
    prefixed with the pipeline component."""
    config = peft_config(lora, sorted(modules)).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    header = json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True, default=str)
    return {"format": "pt", METADATA_KEY: header}


def to_diffusers_lora(adapters: Mapping[str, Tensor], chosen: list[Projection], lora: LoraConfig,
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of `pytorch_lora_weights.safetensors` for our adapter weights (`chosen`
    name diffusers' modules already)."""
    return _write([(proj, proj, a, b) for proj, a, b in adapted(adapters, chosen)], DIFFUSERS, lora)


def to_lora_file(adapters: Mapping[str, Tensor], chosen: list[Projection], lora: LoraConfig, fmt: LoraFormat,
                 cfg) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of our adapter weights in ``fmt`` (a family's format; ``cfg`` the model's
    MMDiTConfig): alpha as 0-d tensors beside each module, or (``fmt.alpha_keys`` off) in the peft header
    diffusers reads, or (``fmt.fold_alpha``) multiplied into B; zero factors on the modules ``fmt.required`` names
    that no adapter covers. ValueError when the format has no module for an adapted projection."""
    table = placements(fmt, cfg)
    missing = [proj.ours for proj in chosen if proj.ours not in table]
    if missing:
        raise ValueError(f"the {fmt.name} LoRA format has no module for flowmatch's {missing[0]} ({len(missing)} "
                         "adapted projections without one): export with --merge (a whole transformer) or --format "
                         "diffusers")
    items = [(proj, table[proj.ours], a, b) for proj, a, b in adapted(adapters, chosen)]
    return _write(items + _zero_items(fmt, cfg, table, {proj.ours for proj in chosen}, lora.rank), fmt, lora)


def _zero_items(fmt: LoraFormat, cfg, table: Mapping[str, object], adapted_modules: set[str], rank: int,
                ) -> list[tuple[None, object, Tensor, Tensor]]:
    """(None, placement, zero A, zero B) of each module ``fmt.required`` names that no adapter covers: factors
    that change nothing, for readers that need every one of them."""
    if fmt.required is None:
        return []
    owner = {name: place for place in table.values() for name in place.theirs}
    missing = sorted({owner[name].ours for name in fmt.required(cfg)} - adapted_modules)
    shapes = linear_shapes(cfg)
    return [(None, table[ours], torch.zeros(rank, shapes[ours][1]), torch.zeros(shapes[ours][0], rank))
            for ours in missing]


def _write(items: list[tuple[Projection, object, Tensor, Tensor]], fmt: LoraFormat, lora: LoraConfig,
           ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors and metadata for (projection, its placement in ``fmt``, A, B) items."""
    tensors: dict[str, Tensor] = {}
    modules = []
    for _, place, a, b in items:
        for name, a_t, b_t in their_factors(place, a, b):
            key = fmt.module_key(name)
            if fmt.fold_alpha:
                b_t = b_t * lora.scale
            tensors[f"{key}.{fmt.suffix('lora', 'A')}"] = a_t
            tensors[f"{key}.{fmt.suffix('lora', 'B')}"] = b_t
            modules.append(name)
            if fmt.alpha_keys:
                tensors[f"{key}.{fmt.suffix('lora', 'alpha')}"] = torch.tensor(float(lora.alpha))
    in_tensors = fmt.alpha_keys or fmt.fold_alpha  # the scale is in the tensors: no peft header
    return tensors, {"format": "pt"} if in_tensors else peft_header(lora, modules, fmt.prefix)


@torch.no_grad()
def merge(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], chosen: list[Projection],
          lora: LoraConfig) -> dict[str, Tensor]:
    """Our full state dict with every adapter merged: W + (alpha / r) B A, computed in float32 and stored in the
    base weight's dtype. Untouched tensors are shared with `base`."""
    out = dict(base)
    for proj, a, b in adapted(adapters, chosen):
        key = f"{proj.ours}.weight"
        w = base[key]
        out[key] = (w.float() + lora.scale * (b.float() @ a.float())).to(w.dtype)
    return out

