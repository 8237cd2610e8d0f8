"""LoRA file formats, family-agnostic: how one adapter of ours is named and laid out in a file other tools read.

A format is a family's key table (which module names the file uses, and how our fused projections map onto
them: :mod:`flowmatch.models.convert.keymap` rules), a naming style and a prefix. Each family declares its formats
in its folder (``flowmatch/families/<family>/lora_formats.py``) and registers them as ``Family.lora_formats``;
nothing here knows a family.

    diffusers  transformer.<diffusers module>.lora_A.weight / .lora_B.weight, the peft header
               ``lora_adapter_metadata`` (rank, alpha, targets): split q/k/v, as diffusers' models name them
    comfyui    diffusion_model.<original module>.lora_down.weight / .lora_up.weight / .alpha: the release's
               single-file modules, fused q/k/v, under the names ComfyUI's own LoRA writer uses (its LoraSave node;
               ComfyUI's key map reads these for every family, and diffusers' FLUX and Qwen-Image loaders convert
               them)
    kohya      lora_unet_<original module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha (a
               0-d tensor): kohya sd-scripts' layout, fused q/k/v

A family's format may differ where its readers need it (Lumina-Image-2's comfyui file: peft's factor names, alpha
folded into B, every block's projections present: :attr:`LoraFormat.fold_alpha`, :attr:`LoraFormat.required`).

Each factor of a module is written under the suffix its style gives: LoRA's ``A`` (rank, in) and ``B`` (out,
rank) are ``lora_A`` / ``lora_B`` (peft) or ``lora_down`` / ``lora_up`` (kohya, comfyui); ``alpha`` is the scale
numerator (the update is alpha / rank x B A). Other adapter kinds plug their factor names in through
:data:`FACTOR_NAMES`.
Reading accepts either spelling in either style (files from other trainers mix them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from flowmatch.models.convert.keymap import Rule
from flowmatch.models.lora import projections

#: How a format spells its keys: module names dotted with peft's factor names (peft), dotted with kohya's factor
#: names (comfyui), underscored with kohya's (kohya).
STYLES = ("peft", "comfyui", "kohya")
#: The pipeline component diffusers' LoRA keys start with.
DIFFUSERS_PREFIX = "transformer"
#: The factor names of each adapter kind, per naming style: our factor -> the file's suffix. Reading also accepts
#: the other styles' suffixes (DoRA's magnitude has a name in peft's style only).
FACTOR_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "lora": {
        "peft": {"A": "lora_A.weight", "B": "lora_B.weight", "alpha": "alpha"},
        "kohya": {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"},
        "comfyui": {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"},
    },
    # DoRA: LoRA's factors and peft's magnitude (one per output row), in peft's names only (diffusers' and peft's
    # files); ComfyUI's and kohya's layouts have no name for it.
    "dora": {"peft": {"A": "lora_A.weight", "B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector",
                      "alpha": "alpha"}},
    # LyCORIS' names, which peft's tuners share (flowmatch.models.convert.adapters writes them): the same in both
    # styles, ComfyUI's loader and kohya-style tools read them.
    **{kind: dict.fromkeys(STYLES, {**{f: f for f in factors}, "alpha": "alpha"}) for kind, factors in {
        "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    }.items()},
}


@dataclass(frozen=True)
class LoraFormat:
    """One file layout of one family's LoRAs."""

    name: str
    """What ``--format`` and messages call it (diffusers, comfyui, kohya; others for read-only layouts)."""
    rules: Callable[[Any], list[Rule]]
    """The family's key table whose module names the file uses: ``rules(model_cfg)``."""
    prefix: str
    """What comes before the module name: ``transformer`` (joined with a dot), ``lora_unet`` (with an underscore)."""
    style: str = "peft"
    """One of :data:`STYLES`. ``peft`` and ``comfyui``: ``<prefix>.<module>.<factor>``; ``kohya``:
    ``<prefix>_<module with _ for .>.<factor>``."""
    alpha_keys: bool = True
    """Write each module's alpha as a 0-d tensor ``<module key>.alpha`` (diffusers' format carries the peft header
    instead)."""
    writes: bool = True
    """``flowmatch export --lora --format`` can write it (False: a layout other trainers write, read only)."""
    tool: str = ""
    """Who reads it, for messages (e.g. "ComfyUI")."""
    fold_alpha: bool = False
    """Write each module's scale alpha / rank into its B factor, with no alpha tensor and no peft header: for
    readers that take alpha = rank (diffusers' Lumina-2 converter drops nothing and refuses any other key)."""
    required: Optional[Callable[[Any], list[str]]] = None
    """The modules (the file's names, without prefix) a reader of this format needs in every file,
    ``required(model_cfg)``: those the adapters leave out are written with zero factors, which change nothing
    (diffusers' Lumina-2 converter reads every block's projections by name)."""

    def module_key(self, module: str) -> str:
        """The file's name of a module (everything before the factor suffix)."""
        if self.style == "kohya":
            return f"{self.prefix}_{module.replace('.', '_')}"
        return f"{self.prefix}.{module}" if self.prefix else module

    def suffix(self, kind: str, factor: str) -> str:
        """The file's suffix of an adapter kind's factor; ValueError when this format has no name for the kind."""
        names = FACTOR_NAMES.get(kind, {}).get(self.style)
        if names is None or factor not in names:
            raise ValueError(f"the {self.name} LoRA format cannot express {kind} adapters: export with --merge (a "
                             "whole transformer) or --format diffusers")
        return names[factor]


@dataclass(frozen=True)
class Placement:
    """Where one of our adapted projections sits in a format: the format's module names and the key-table op that
    makes our weight from theirs (their rows split, swapped or permuted as the base weight's are)."""

    ours: str
    """Our module name, e.g. joint_blocks.0.img.qkv."""
    theirs: tuple[str, ...]
    """The format's module names (without prefix), in the order their rows stack in ours."""
    op: object
    """The key-table operation (:mod:`flowmatch.models.convert.keymap`)."""


def placements(fmt: LoraFormat, cfg) -> dict[str, Placement]:
    """Our module name -> its placement in ``fmt``, for every linear of the model ``cfg`` describes."""
    return {p.ours: Placement(p.ours, p.theirs, p.op) for p in projections(cfg, fmt.rules(cfg))}


def module_index(fmt: LoraFormat, table: Mapping[str, Placement]) -> dict[str, tuple[Placement, int]]:
    """The file's module key -> (placement, position among the placement's modules)."""
    return {fmt.module_key(name): (place, i) for place in table.values() for i, name in enumerate(place.theirs)}


def split_key(key: str, kinds: Optional[list[str]] = None) -> Optional[tuple[str, str, str]]:
    """(module key, adapter kind, our factor) of a file key whose suffix is a known factor name of any style, else
    None. ``kinds`` limits the adapter kinds tried."""
    for kind in kinds or list(FACTOR_NAMES):
        for names in FACTOR_NAMES[kind].values():
            for factor, suffix in names.items():
                if key.endswith("." + suffix):
                    return key[:-len(suffix) - 1], kind, factor
    return None


def diffusers_format(rules: Callable[[Any], list[Rule]]) -> LoraFormat:
    """diffusers' layout over a family's diffusers key table: peft keys under ``transformer.``, the LoraConfig in the
    safetensors header."""
    return LoraFormat("diffusers", rules, prefix=DIFFUSERS_PREFIX, alpha_keys=False,
                      tool="diffusers' load_lora_weights")


def released_formats(diffusers_rules: Callable[[Any], list[Rule]], original_rules: Callable[[Any], list[Rule]],
                     ) -> dict[str, LoraFormat]:
    """The three formats of a family whose diffusers key table and release single-file key table are given:
    diffusers (split q/k/v), ComfyUI and kohya (the release's fused modules)."""
    return {
        "diffusers": diffusers_format(diffusers_rules),
        "comfyui": LoraFormat("comfyui", original_rules, prefix="diffusion_model", style="comfyui",
                              tool="ComfyUI's LoraLoader"),
        "kohya": LoraFormat("kohya", original_rules, prefix="lora_unet", style="kohya",
                            tool="kohya sd-scripts and the tools that read its files"),
    }
