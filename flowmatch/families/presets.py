"""Named model sizes: every family's presets (``flowmatch/families/<family>/presets.py``), each written as its
difference from the `MMDiTConfig` defaults (SD3-medium's layout), and the mechanics to read them."""

from __future__ import annotations

import dataclasses
from typing import Any

from flowmatch.errors import nearest
from flowmatch.families import FAMILIES, Family
from flowmatch.families.mmdit import KIND
from flowmatch.models.mmdit import MMDiTConfig

#: Which family each preset belongs to.
PRESET_FAMILY: dict[str, Family] = {name: f for f in FAMILIES.values() for name in f.presets}
#: Every preset by name.
PRESETS: dict[str, dict[str, Any]] = {name: dict(f.presets[name]) for name, f in PRESET_FAMILY.items()}

_FIELDS = {f.name for f in dataclasses.fields(MMDiTConfig)}


def _unknown(kind: str, name: str, allowed: list[str]) -> ValueError:
    close = nearest(name, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (allowed: {', '.join(sorted(allowed))})")


#: The name of a config built field by field (e.g. converted weights that match no preset): the defaults.
CUSTOM = "custom"


def preset_values(name: str) -> dict[str, Any]:
    """Every `MMDiTConfig` field of preset `name`, `preset` included (a U-Net preset adds the `ModelConfig` fields
    `kind` and `unet`); "custom" gives the `MMDiTConfig` defaults
    (a saved recipe whose weights matched no preset lists every field anyway). ValueError for unknown names."""
    if name not in PRESETS and name != CUSTOM:
        raise _unknown("MMDiT preset", name, [*PRESETS, CUSTOM])
    values = dataclasses.asdict(MMDiTConfig())
    values.update(PRESETS.get(name, {}))
    values["preset"] = name
    return values


def mmdit_presets(family: Family) -> list[str]:
    """The presets of `family` that are MMDiT configs (all of an MMDiT family's; none of the U-Net's)."""
    return list(family.presets) if family.kind == KIND else []


def config_from_preset(name: str, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of preset `name` with `overrides` (field -> value) applied on top."""
    values = preset_values(name)
    if name in PRESET_FAMILY and name not in mmdit_presets(PRESET_FAMILY[name]):
        raise ValueError(f"preset {name!r} is a model.kind: {values['kind']} preset, not an MMDiT's; use it as the "
                         "recipe's model.preset")
    for key in overrides:
        if key not in _FIELDS:
            raise _unknown("MMDiTConfig field", key, sorted(_FIELDS))
    values.update(overrides)
    return MMDiTConfig(**values)
