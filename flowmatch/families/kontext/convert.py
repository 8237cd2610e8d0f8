"""FLUX.1 Kontext's weights: FLUX.1's (:mod:`flowmatch.families.flux.convert`), with one reference image.

A Kontext transformer is a diffusers `FluxTransformer2DModel` (and BFL's flux1-kontext-dev.safetensors a FLUX.1
single file) whose config says nothing of references: the key tables and config mappings are FLUX's, and what
makes the weights Kontext's is where they come from (a `FluxKontextPipeline` folder, or a recipe naming
``model.family: kontext``). Converted configs take ``references = 1``, the one reference image
FluxKontextPipeline passes: its packed latents after the image's, with position ids (1, row, column).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.flux.convert import (  # noqa: F401 - this family's converter is FLUX's key tables
    DIFFUSERS_CLASS,
    ORIGINAL_PREFIX,
    PACK,
    check_original,
    diffusers_config,
    diffusers_rules,
    is_original,
    original_rules,
)
from flowmatch.families.flux.convert import config_from_diffusers as flux_config_from_diffusers
from flowmatch.families.flux.convert import config_from_original as flux_config_from_original
from flowmatch.models.mmdit import MMDiTConfig

#: Reference images FluxKontextPipeline passes per sample.
REFERENCES = 1


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """FLUX's config of a diffusers `FluxTransformer2DModel` config, taking Kontext's reference image."""
    return dataclasses.replace(flux_config_from_diffusers(dcfg), references=REFERENCES)


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """FLUX's config inferred from BFL keys, taking Kontext's reference image."""
    return dataclasses.replace(flux_config_from_original(sd, head_dim), references=REFERENCES)
