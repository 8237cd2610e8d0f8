"""The recipe's `model` section: the family and its architecture (the MMDiT fields, or the U-Net's `unet`
sub-section), the weights it starts from, and its LoRA adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from flowmatch.families import family_of, get_family
from flowmatch.models.lora import LoraConfig
from flowmatch.models.mmdit import MMDiTConfig
from flowmatch.models.unet import UNetConfig

#: MMDiTConfig fields that describe the network (all but the preset's name).
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(MMDiTConfig) if f.name != "preset")


@dataclass
class ModelConfig(MMDiTConfig):
    """The recipe's model section: an MMDiTConfig (from model.preset), the family and where its weights
    come from."""

    family: Optional[str] = None
    """Model family (flowmatch.families): sd3 | flux | qwen_image | unet; null = inferred from model.kind and model.rope
    (unet for model.kind: unet, flux for an MMDiT with rope: true, else sd3), as recipes before families say it."""
    kind: str = "mmdit"
    """Backbone: mmdit (the MMDiTConfig fields) | unet (diffusers' UNet2DConditionModel, flowmatch/models/unet.py);
    follows model.family when that is set."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """The U-Net's layout, used by the unet family (its patch_size should be the U-Net's downsampling factor)."""

    init_from: Optional[str] = None
    """Start from these weights instead of a random init, at step 0 with a fresh optimizer: a diffusers pipeline
    or transformer folder, a hub id, an original single-file .safetensors, or a flowmatch run or checkpoint
    directory; the architecture is read from them (flowmatch.init_from)."""
    lora: Optional[LoraConfig] = None
    """Train LoRA adapters on the frozen init_from weights instead of the weights themselves; null = full training."""

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):  # presets and asdict() round trips hand the section over as a mapping
            self.unet = UNetConfig(**self.unet)
        if self.family is not None:
            self.kind = get_family(self.family).kind
        family = family_of(self)  # ValueError for an unknown family or kind, or a section that does not fit it
        can = family.capabilities
        if (self.init_from and not can.init_from) or (self.lora is not None and not can.lora):
            # init_from reads the architecture and weights of converted checkpoints and pipelines; LoRA targets
            # name the family's diffusers modules.
            raise ValueError(f"model.init_from and model.lora load and adapt MMDiT weights; model.family: "
                             f"{family.name} (model.kind: {self.kind}) trains from its random init: remove "
                             "model.init_from / model.lora, or use an sd3 or flux model")
        if self.lora is not None and not self.init_from:
            raise ValueError("model.lora adapts existing weights: set model.init_from (a pipeline, transformer, "
                             "single file or flowmatch run) or remove model.lora to train all weights")

    def architecture(self) -> MMDiTConfig:
        """The plain MMDiTConfig the model is built from."""
        return MMDiTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MMDiTConfig)})
