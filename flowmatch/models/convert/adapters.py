"""Every adapter kind (``model.lora.kind``: lora, dora, loha, lokr) as diffusers/peft names it, and merged.

The file is the one LoRA writes (:mod:`.lora`): ``pytorch_lora_weights.safetensors`` with peft's keys per
diffusers module, ``transformer.<diffusers module>.<factor>`` (peft's ``get_peft_model_state_dict`` names), and the
``lora_adapter_metadata`` header holding the peft config. diffusers' ``load_lora_weights`` reads lora and dora
(``lora_magnitude_vector``); loha and lokr are peft's LyCORIS tuners, which diffusers' loader does not build, so
they load through peft itself onto the diffusers transformer (:func:`load_into`).

Each factor of an adapter on one of our projections is written per diffusers module by the converter's weight
operation, as the base weight is: factors on the output side (LoRA's B, DoRA's magnitude, LoHa's ``hada_w*_a``)
are split, swapped or permuted as the weight's rows are; factors on the input side (A, ``hada_w*_b``) as its
columns. Both are exact: DoRA's magnitude and weight norm are per output row, and a LoHa's rows are the
elementwise product of its two LoRAs' rows. A LoKr's Kronecker product kron(w1, w2) splits by rows only when
each part is a whole number of w2's rows and peft would factor the part's shape the same way; a fused
projection where that fails (SD3's Q, K, V at the default factor) cannot be written per diffusers module and
says so: export it merged (``--merge``).

Merging uses peft's own ``merge`` per projection in float32 (DoRA's rescaling included) and stores the base
weight's dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from flowmatch.models.convert.keymap import Copy, Packed, Stack, SwapHalves, Tail
from flowmatch.models.convert.lora import METADATA_KEY, PREFIX, merge, peft_header, to_diffusers_lora, to_lora_file
from flowmatch.models.convert.lora_formats import LoraFormat, placements
from flowmatch.models.lora import ADAPTER, LoraConfig, Projection, peft_config

__all__ = ["ExportError", "factors_of", "load_into", "loader_of", "merge_adapters", "to_adapter_file",
           "to_diffusers_adapters"]

#: Factors on a projection's output side (their first axis is the weight's rows); the others (lora_A, hada_w1_b,
#: hada_w2_b) are on its input side (their last axis is the weight's columns).
ROWS = ("lora_B", "lora_magnitude_vector", "hada_w1_a", "hada_w2_a")
#: LoKr's Kronecker factors: w1 (or w1_a) holds the row blocks, w2 the rows within a block.
KRON_OUTER = ("lokr_w1", "lokr_w1_a")


def loader_of(kind: str, pipeline: str = "StableDiffusion3Pipeline / FluxPipeline") -> str:
    """How a diffusers user loads an exported file of this adapter kind into ``pipeline``."""
    if kind in ("lora", "dora"):
        return f"pipe.load_lora_weights(OUT_DIR) ({pipeline})"
    return (f"flowmatch.models.convert.adapters.load_into(pipe.transformer, tensors, metadata) (peft's {kind} "
            "tuner; diffusers' load_lora_weights does not build it)")


class ExportError(ValueError):
    """An adapter this format cannot express; the message names the projection and suggests ``--merge``."""


def factors_of(adapters: Mapping[str, Tensor], module: str) -> dict[str, Tensor]:
    """peft's factor name -> tensor of the adapter on our `module` (``<module>.<factor>.default[.weight]``)."""
    head, out = f"{module}.", {}
    for key, value in adapters.items():
        if key.startswith(head):
            factor, _, rest = key[len(head):].partition(".")
            if rest.split(".")[0] == ADAPTER and "." not in factor:
                out[factor] = value
    if not out:
        raise KeyError(f"no adapter factors for {module} in the checkpoint's weights")
    return out


def _rowwise(op, t: Tensor, n: int) -> list[Tensor]:
    if isinstance(op, Stack):
        return [p.clone() for p in t.split(op.sizes, dim=0)]
    if isinstance(op, (SwapHalves, Tail)) or (isinstance(op, Packed) and op.axis == 0):
        (theirs,) = op.to_theirs(t, None, t.dtype)
        return [theirs.contiguous()]
    return [t.clone() for _ in range(n)]


def _columnwise(op, t: Tensor, n: int) -> list[Tensor]:
    if isinstance(op, Packed) and op.axis == 1:
        (theirs,) = op.to_theirs(t, None, t.dtype)
        return [theirs.contiguous().clone() for _ in range(n)]
    return [t.clone() for _ in range(n)]


def _kron_parts(proj: Projection, fs: dict[str, Tensor], lora: LoraConfig, peft_shapes: bool) -> list[dict]:
    """The per-module factors of a LoKr adapter on `proj`, or ExportError when its rows cannot be split.
    ``peft_shapes``: each part must also be the shape peft gives that module (a file peft loads)."""
    from peft.tuners.lokr.layer import factorization  # peft loads transformers: LoKr exports only

    op, n = proj.op, len(proj.theirs)
    if type(op) is Copy:
        return [{k: v.clone() for k, v in fs.items()}]
    outer = next(k for k in KRON_OUTER if k in fs)
    block = fs.get("lokr_w2", fs.get("lokr_w2_a")).shape[0]  # rows of w2: the rows within one outer row
    sizes = op.sizes if isinstance(op, Stack) else (op.head,) if isinstance(op, Tail) else ()
    # peft factors each diffusers module's rows itself: the larger factor must be w2's rows again.
    fits = all(s % block == 0 and (not peft_shapes or factorization(s, lora.factor)[1] == block) for s in sizes)
    if not sizes or not fits:
        raise ExportError(
            f"a LoKr adapter on flowmatch's {proj.ours} is one Kronecker product whose rows do not map onto "
            f"{', '.join(proj.theirs)} ({type(op).__name__}) as one LoKr each at model.lora.factor={lora.factor}: "
            "export it merged (--merge), or train LoKr on targets whose rows flowmatch keeps in their order")
    rest = {k: v.clone() for k, v in fs.items() if k != outer}
    if isinstance(op, Tail):  # their leading rows never reach an output: zero outer rows, so no update there
        head = fs[outer].new_zeros(op.head // block, fs[outer].shape[1])
        return [{**rest, outer: torch.cat([head, fs[outer]])}]
    parts = fs[outer].split([s // block for s in sizes], dim=0)
    return [{**rest, outer: p.clone()} for p in parts[:n]]


def _their_factors(proj: Projection, fs: dict[str, Tensor], lora: LoraConfig, peft_shapes: bool = True,
                   ) -> list[tuple[str, dict]]:
    """(their module, factor name -> tensor) for one adapter of ours (``proj`` a Projection or a format's
    Placement)."""
    n = len(proj.theirs)
    if lora.kind == "lokr":
        return list(zip(proj.theirs, _kron_parts(proj, fs, lora, peft_shapes)))
    if not isinstance(proj.op, (Copy, Stack, SwapHalves, Packed, Tail)) or (type(proj.op) is Copy and n != 1):
        raise ExportError(f"no {lora.kind} conversion for {proj.ours} ({type(proj.op).__name__})")
    per: list[dict] = [{} for _ in range(n)]
    for name, t in fs.items():
        pieces = _rowwise(proj.op, t, n) if name in ROWS else _columnwise(proj.op, t, n)
        for i, piece in enumerate(pieces):
            per[i][name] = piece
    return list(zip(proj.theirs, per))


def _peft_key(module: str, factor: str) -> str:
    """peft's saved name of a factor (``get_peft_model_state_dict``): nn.Linear factors end in ``.weight``, the
    LyCORIS tuners' parameters and DoRA's magnitude do not."""
    suffix = ".weight" if factor in ("lora_A", "lora_B") else ""
    return f"{PREFIX}.{module}.{factor}{suffix}"


def to_diffusers_adapters(adapters: Mapping[str, Tensor], chosen: list[Projection], lora: LoraConfig,
                          ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of ``pytorch_lora_weights.safetensors`` for our adapter weights of any kind
    (lora: :func:`flowmatch.models.convert.lora.to_diffusers_lora`); ExportError for a LoKr on a fused projection
    whose rows do not split."""
    if lora.kind == "lora":
        return to_diffusers_lora(adapters, chosen, lora)
    tensors: dict[str, Tensor] = {}
    for proj in chosen:
        for name, fs in _their_factors(proj, factors_of(adapters, proj.ours), lora):
            tensors.update({_peft_key(name, f): t for f, t in fs.items()})
    modules = sorted({k[len(PREFIX) + 1:].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in tensors})
    return tensors, peft_header(lora, modules)


def to_adapter_file(adapters: Mapping[str, Tensor], chosen: list[Projection], lora: LoraConfig, fmt: LoraFormat,
                    cfg) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of our adapters of any kind in a family's LoRA format ``fmt`` (``cfg`` the
    model's MMDiTConfig): lora by :func:`flowmatch.models.convert.lora.to_lora_file`; the others in diffusers'
    peft names (:func:`to_diffusers_adapters`) or, in the ComfyUI and kohya layouts, under LyCORIS' factor names
    with an ``alpha`` tensor per module. ValueError (ExportError) when the format cannot express the kind."""
    if lora.kind == "lora":
        return to_lora_file(adapters, chosen, lora, fmt, cfg)
    if fmt.fold_alpha:  # its readers take LoRA factors only, at alpha = rank
        raise ExportError(f"the {fmt.name} LoRA format of this family cannot express {lora.kind} adapters: export "
                          "with --merge (a whole transformer) or --format diffusers")
    if not fmt.alpha_keys:  # diffusers: the peft header carries rank and alpha
        return to_diffusers_adapters(adapters, chosen, lora)
    table, tensors = placements(fmt, cfg), {}
    for proj in chosen:
        if proj.ours not in table:
            raise ExportError(f"the {fmt.name} LoRA format has no module for flowmatch's {proj.ours}: export with "
                              "--merge (a whole transformer) or --format diffusers")
        for name, fs in _their_factors(table[proj.ours], factors_of(adapters, proj.ours), lora, peft_shapes=False):
            key = fmt.module_key(name)
            if lora.kind == "lokr" and "lokr_w1" in fs and "lokr_w2" in fs:
                # LyCORIS readers scale two whole Kronecker factors by 1, not alpha / rank: fold peft's scale in.
                fs = {**fs, "lokr_w2": fs["lokr_w2"] * lora.scale}
            for factor, t in fs.items():
                tensors[f"{key}.{fmt.suffix(lora.kind, factor)}"] = t
            tensors[f"{key}.{fmt.suffix(lora.kind, 'alpha')}"] = torch.tensor(float(lora.alpha))
    return tensors, {"format": "pt"}


def load_into(transformer: nn.Module, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Inject the adapters of a ``pytorch_lora_weights.safetensors`` of any kind into a diffusers transformer
    (``pipe.transformer``) through peft: what diffusers' ``load_lora_weights`` does for lora and dora, and the way
    to load loha and lokr, which it does not build."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict  # peft loads transformers
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    header = {k[len(PREFIX) + 1:]: v for k, v in json.loads(metadata[METADATA_KEY]).items()}
    config = PEFT_TYPE_TO_CONFIG_MAPPING[header["peft_type"]].from_peft_type(**header)
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    state = {k[len(PREFIX) + 1:]: v for k, v in tensors.items() if k.startswith(PREFIX + ".")}
    loaded = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    if loaded.unexpected_keys:
        raise ValueError(f"adapter keys that match no module of the transformer: {loaded.unexpected_keys[:4]} "
                         f"({len(loaded.unexpected_keys)} in all)")


@torch.no_grad()
def merge_adapters(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], chosen: list[Projection],
                   lora: LoraConfig) -> dict[str, Tensor]:
    """Our full state dict with every adapter of any kind merged into its projection's weight by peft, in float32,
    stored in the base weight's dtype (lora: :func:`flowmatch.models.convert.lora.merge`). Untouched tensors are
    shared with `base`."""
    if lora.kind == "lora":
        return merge(base, adapters, chosen, lora)
    from peft import inject_adapter_in_model  # peft loads transformers: only adapter runs pay for it

    out = dict(base)
    for proj in chosen:
        key = f"{proj.ours}.weight"
        w = base[key]
        bias = base.get(f"{proj.ours}.bias")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        holder = nn.ModuleDict({"m": linear})
        holder.load_state_dict({"m.weight": w.float(), **({"m.bias": bias.float()} if bias is not None else {})},
                               assign=True)
        inject_adapter_in_model(peft_config(lora, ["m"]), holder, adapter_name=ADAPTER)
        state = {f"m.{k[len(proj.ours) + 1:]}": v.float() for k, v in adapters.items()
                 if k.startswith(proj.ours + ".")}
        loaded = holder.load_state_dict(state, strict=False, assign=True)
        if loaded.unexpected_keys:
            raise KeyError(f"adapter factors of {proj.ours} that peft's {lora.kind} has no place for: "
                           f"{loaded.unexpected_keys[:4]}")
        holder["m"].merge(safe_merge=True, adapter_names=[ADAPTER])
        out[key] = holder["m"].get_base_layer().weight.detach().to(w.dtype)
    return out
