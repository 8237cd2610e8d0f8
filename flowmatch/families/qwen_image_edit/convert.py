"""Qwen-Image-Edit's weights: Qwen-Image's (:mod:`flowmatch.families.qwen_image.convert`), with one reference image.

A Qwen-Image-Edit transformer is a diffusers `QwenImageTransformer2DModel` whose config says nothing of references:
the key tables and config mappings are Qwen-Image's, and what makes the weights an editing model's is where they
come from (a `QwenImageEditPipeline` folder, or a recipe naming ``model.family: qwen_image_edit``). Converted
configs take ``references = 1``, the one reference image QwenImageEditPipeline passes: its packed latents after
the target's, at MSRoPE frame 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.qwen_image.convert import (  # noqa: F401 - this family's converter is Qwen-Image's tables
    DIFFUSERS_CLASS,
    ORIGINAL_PREFIX,
    PACK,
    check_original,
    diffusers_config,
    diffusers_rules,
    is_original,
    original_rules,
)
from flowmatch.families.qwen_image.convert import config_from_diffusers as qwen_config_from_diffusers
from flowmatch.families.qwen_image.convert import config_from_original as qwen_config_from_original
from flowmatch.models.mmdit import MMDiTConfig

#: Reference images QwenImageEditPipeline passes per sample.
REFERENCES = 1


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Qwen-Image's config of a diffusers `QwenImageTransformer2DModel` config, taking the edit's reference."""
    return dataclasses.replace(qwen_config_from_diffusers(dcfg), references=REFERENCES)


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Qwen-Image's config inferred from the single file's keys, taking the edit's reference."""
    return dataclasses.replace(qwen_config_from_original(sd, head_dim), references=REFERENCES)
