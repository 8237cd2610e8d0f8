"""The shared model blocks (the MMDiT and diffusers' U-Net behind flowmatch's call), FLOP accounting, training
transforms and the LoRA machinery. Families (presets, converters, the recipe's model section) are
:mod:`flowmatch.families`."""

from flowmatch.models.flops import ParamCount, StepFlops, count_parameters, mfu, training_flops_per_step
from flowmatch.models.lora import LoraConfig
from flowmatch.models.mmdit import MMDiT, MMDiTConfig
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile

__all__ = [
    "LoraConfig",
    "MMDiT",
    "MMDiTConfig",
    "ParamCount",
    "StepFlops",
    "apply_activation_checkpointing",
    "apply_compile",
    "count_parameters",
    "mfu",
    "training_flops_per_step",
]
