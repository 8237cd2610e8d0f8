"""LoRA on a family's model: its default targets and its converter's diffusers key table, through the shared
machinery of :mod:`flowmatch.models.lora`.

    chosen = apply_lora(model, LoraConfig(rank=16, alpha=16))   # targets None: the family's defaults
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from flowmatch.errors import RecipeError
from flowmatch.families import Family, family_of
from flowmatch.models.convert.adapters_read import fit, read_adapters
from flowmatch.models.convert.lora_formats import LoraFormat, diffusers_format
from flowmatch.models.convert.lora_read import FileAdapters, file_adapters, read_lora_file
from flowmatch.models.lora import LoraConfig, Projection, inject, projections, select_from
from flowmatch.models.mmdit import MMDiT, MMDiTConfig

__all__ = ["apply_file_adapters", "apply_lora", "default_targets", "load_lora_file", "lora_formats", "select",
           "set_adapters"]


def _adaptable(cfg: MMDiTConfig) -> Family:
    family = family_of(cfg)
    if not family.capabilities.lora or family.converter is None or family.lora_targets is None:
        raise RecipeError(f"model.lora: the {family.name} family has no LoRA targets ({family.summary})")
    return family


def lora_formats(family: Family) -> Mapping[str, LoraFormat]:
    """The family's LoRA file formats; a family that declares none still has diffusers' (its converter's diffusers
    key table), as LoRA export had before formats."""
    if family.lora_formats:
        return family.lora_formats
    return {"diffusers": diffusers_format(family.converter.diffusers_rules)}


def default_targets(cfg: MMDiTConfig) -> list[str]:
    """The targets diffusers' LoRA scripts train for this model's family."""
    return _adaptable(cfg).lora_targets(cfg)


def select(cfg: MMDiTConfig, targets: Optional[list[str]]) -> list[Projection]:
    """Our projections the targets name (None = :func:`default_targets`); RecipeError for a target that names
    nothing, a fused projection named only in part, or a layer LoRA cannot adapt here."""
    family = _adaptable(cfg)
    available = projections(cfg, family.converter.diffusers_rules(cfg))
    return select_from(available, targets, family.lora_targets(cfg))


def apply_lora(model: MMDiT, lora: LoraConfig) -> list[Projection]:
    """Freeze `model` and inject the adapters (peft, in place; A random, B zero, so the output is unchanged);
    returns the adapted projections. Seed torch first: A is drawn from its generator."""
    return inject(model, lora, select(model.cfg, lora.targets))


def training_flops(cfg: MMDiTConfig, lora: Optional[LoraConfig], *, batch_size: int, latent_size: tuple[int, int],
                   text_len: int) -> float:
    """Training FLOPs of one step of the model section ``cfg``: its family's count (every weight trained), or with
    ``lora`` the count of the frozen base and the adapters the recipe injects (the same targets and rank)."""
    family = family_of(cfg)
    sizes = dict(batch_size=batch_size, latent_size=latent_size, text_len=text_len)
    if lora is None:
        return family.flops(cfg, **sizes)
    return family.flops(cfg, **sizes, adapt=lambda model: apply_lora(model, lora))


def load_lora_file(model: MMDiT, lora: LoraConfig, path: str) -> str:
    """Set the adapters :func:`apply_lora` injected to those of the adapter file at ``path``, of the recipe's kind
    (lora, or dora / loha / lokr: :mod:`flowmatch.models.convert.adapters_read`), in any of the family's formats
    (diffusers, ComfyUI, kohya, and the read-only layouts of other trainers); returns the format's name.
    ValueError naming counts and examples of keys that do not land (nothing is loaded in part)."""
    family = _adaptable(model.cfg)
    what = f"model.lora.init_from={path!r}"
    tensors, metadata = read_lora_file(path)
    chosen = select(model.cfg, lora.targets)
    if lora.kind != "lora":
        fmt, found = read_adapters(tensors, metadata, lora_formats(family), model.cfg, lora, what=what)
        set_adapters(model, fit(found, dict(model.named_parameters()), chosen, what))
        return fmt
    adapters = file_adapters(tensors, metadata, lora_formats(family), model.cfg, scale=lora.scale, what=what)
    set_adapters(model, adapters.fit(chosen, lora, what=what))
    return adapters.format


def apply_file_adapters(model: MMDiT, found: FileAdapters) -> list[Projection]:
    """Freeze ``model`` and inject exactly the adapters a LoRA file holds (read with scale 1), at its largest rank
    (smaller ones padded with zeros); returns the adapted projections."""
    family = _adaptable(model.cfg)
    available = projections(model.cfg, family.converter.diffusers_rules(model.cfg))
    chosen = [p for p in available if p.ours in found.adapters]
    lora = LoraConfig(rank=found.rank, alpha=found.rank)
    inject(model, lora, chosen)
    set_adapters(model, found.fit(chosen, lora))
    return chosen


def set_adapters(model: MMDiT, adapters: dict[str, Tensor]) -> None:
    """Copy adapter tensors (keyed as the model's state dict) into the injected adapters; ValueError on a shape
    that differs."""
    params = dict(model.named_parameters())
    for key, value in adapters.items():
        param = params[key]
        if param.shape != value.shape:
            raise ValueError(f"LoRA adapter {key} is {tuple(value.shape)} in the file, {tuple(param.shape)} in the "
                             "model")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
