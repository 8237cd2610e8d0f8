"""The MMDiT velocity model, its presets, FLOP accounting, training transforms, LoRA and diffusers interchange."""

from flowmatch.models.convert import from_diffusers, from_original, save_original, to_diffusers, to_original
from flowmatch.models.config import ModelConfig
from flowmatch.models.flops import ParamCount, StepFlops, count_parameters, mfu, training_flops_per_step
from flowmatch.models.lora import LoraConfig, apply_lora
from flowmatch.models.mmdit import MMDiT, MMDiTConfig
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile
from flowmatch.models.presets import PRESETS, config_from_preset, preset_values

__all__ = [
    "LoraConfig",
    "MMDiT",
    "MMDiTConfig",
    "ModelConfig",
    "PRESETS",
    "ParamCount",
    "StepFlops",
    "apply_activation_checkpointing",
    "apply_lora",
    "apply_compile",
    "config_from_preset",
    "count_parameters",
    "from_diffusers",
    "from_original",
    "mfu",
    "preset_values",
    "save_original",
    "to_diffusers",
    "to_original",
    "training_flops_per_step",
]
