"""Model families: each is one folder holding what is particular to it (presets, converters, LoRA targets,
text and latent layout, time convention, FLOP count, capabilities, diffusers pipeline), registered once here.
Everything else asks the family of a model section (:func:`family_of`) and never compares family names.

    FAMILIES                       name -> Family (sd3, flux, kontext, qwen_image, qwen_image_edit, chroma,
                                   zimage, lumina2, flux2, unet)
    get_family("flux")             the Family, or a ValueError with the nearest name
    family_of(recipe.model)        model.family when the recipe states it, else inferred (model.kind, model.rope)
    build_backbone(recipe.model)   family_of(cfg).build(cfg): the network
    check_references(family, n)    ValueError naming the family when it takes fewer than n reference images
    PIPELINES                      diffusers pipeline class name -> FamilyPipeline (its family, what it does);
                                   a family may have several (FLUX.2: Flux2KleinPipeline, Flux2Pipeline)
    diffusers_pipeline(name)       the DiffusersPipeline of a pipeline class, or of a family (its default)

Adding a family is one folder beside these and one line in :data:`FAMILIES` (CONTRIBUTING.md lists its tests).
The recipe key is ``model.family``; a section without it (every recipe and checkpoint written before families)
is read as before: ``model.kind: unet`` is the U-Net, an MMDiT with ``model.rope: true`` is FLUX, else SD3.
"""

from __future__ import annotations

from typing import Any, Union

from torch import nn

from flowmatch.encoders.combine import SINGLE, SingleLayout, TextLayout
from flowmatch.errors import choice_error
from flowmatch.families import chroma, flux, flux2, kontext, lumina2, qwen_image, qwen_image_edit, sd3, unet, zimage
from flowmatch.families.spec import Capabilities, DiffusersPipeline, Family, FamilyPipeline

__all__ = ["FAMILIES", "MODEL_KINDS", "PIPELINES", "Capabilities", "Family", "FamilyPipeline", "build_backbone",
           "check_references", "diffusers_pipeline", "family_of", "get_family", "text_layout"]

#: Every family, by name; the order is the order in which a section that names none is matched.
FAMILIES: dict[str, Family] = {f.name: f for f in (sd3.FAMILY, flux.FAMILY, kontext.FAMILY, qwen_image.FAMILY,
                                                   qwen_image_edit.FAMILY, chroma.FAMILY, zimage.FAMILY,
                                                   lumina2.FAMILY, flux2.FAMILY, unet.FAMILY)}
#: Every diffusers pipeline class flowmatch reads and exports, by its model_index.json ``_class_name``: its family
#: and what it does (a family's default pipeline and its variants).
PIPELINES: dict[str, FamilyPipeline] = {p.pipeline_class: FamilyPipeline(f, p) for f in FAMILIES.values()
                                        for p in f.pipelines}
#: The backbones ``model.kind`` names (kept for recipes written before ``model.family``).
MODEL_KINDS: tuple[str, ...] = tuple(dict.fromkeys(f.kind for f in FAMILIES.values()))
#: ``text_encoders.combine`` values: one encoder as it is, or a family's pipeline's combination.
TEXT_LAYOUTS: dict[str, Union[SingleLayout, TextLayout]] = {
    SINGLE.name: SINGLE, **{f.name: f.text for f in FAMILIES.values() if f.text is not None}}


def get_family(name: str, key: str = "model.family") -> Family:
    """The family called ``name``; ValueError naming ``key``, the families and the nearest spelling."""
    if name not in FAMILIES:
        raise choice_error(key, name, FAMILIES)
    return FAMILIES[name]


def diffusers_pipeline(name: str, key: str = "pipeline") -> DiffusersPipeline:
    """What the diffusers pipeline ``name`` does: a pipeline class (:data:`PIPELINES`), or a family's default
    pipeline by the family's name; ValueError naming ``key`` and the families and classes there are."""
    if name in PIPELINES:
        return PIPELINES[name].pipeline
    family = FAMILIES.get(name)
    if family is None or family.diffusers is None:
        raise choice_error(key, name, [f.name for f in FAMILIES.values() if f.diffusers] + list(PIPELINES))
    return family.diffusers


def family_of(cfg: Any) -> Family:
    """The family of a model section (or an MMDiTConfig, as converted weights give it): ``model.family`` when
    stated, which the section must then fit, else the first family that claims it (``model.kind``, ``model.rope``).
    ValueError naming what does not fit."""
    name = getattr(cfg, "family", None)
    if name is not None:
        family = get_family(name)
        if not family.claims(cfg):
            found = next((f.name for f in FAMILIES.values() if f.claims(cfg)), None)
            raise ValueError(f"model.family: {name} needs {family.mismatch}, but the model section is a {found} "
                             f"model's: set model.family: {found} or give a {name} preset / weights")
        return family
    for family in FAMILIES.values():
        if family.claims(cfg):
            return family
    raise choice_error("model.kind", getattr(cfg, "kind", None), MODEL_KINDS)


def build_backbone(cfg: Any, **kwargs: Any) -> nn.Module:
    """The one place a model section becomes a network: its family's ``build`` (``kwargs``, e.g. ``device``, go
    to the MMDiT's constructor)."""
    return family_of(cfg).build(cfg, **kwargs)


def text_layout(name: str) -> Union[SingleLayout, TextLayout]:
    """The text combination ``text_encoders.combine`` names: ``single`` or a family's (sd3, flux)."""
    if name not in TEXT_LAYOUTS:
        raise choice_error("text_encoders.combine", name, TEXT_LAYOUTS)
    return TEXT_LAYOUTS[name]


def check_references(family: Family, count: int, what: str = "reference images") -> None:
    """ValueError naming ``family`` when a sample carries ``count`` reference images and it takes fewer; ``what``
    names where they came from (a recipe key, an argument), for the message."""
    most = family.capabilities.references
    if count <= most:
        return
    editing = [f.name for f in FAMILIES.values() if f.capabilities.references >= count]
    takes = f"at most {most}" if most else "none (a text-to-image family)"
    instead = f"an editing family ({', '.join(editing)})" if editing else "fewer references"
    raise ValueError(f"{what}: {count} per sample, but model family {family.name!r} takes {takes}; use "
                     f"{instead} or drop the references")
