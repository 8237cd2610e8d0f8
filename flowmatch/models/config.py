"""The recipe's `model` section: the backbone (the MMDiT, or diffusers' U-Net), its architecture, the weights it
starts from, and its LoRA adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from flowmatch.errors import choice_error
from flowmatch.models.lora import LoraConfig
from flowmatch.models.mmdit import MMDiTConfig
from flowmatch.models.unet import UNetConfig

#: MMDiTConfig fields that describe the network (all but the preset's name).
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(MMDiTConfig) if f.name != "preset")

#: The backbones model.kind names (flowmatch.models.backbone builds them).
MODEL_KINDS = ("mmdit", "unet")


@dataclass
class ModelConfig(MMDiTConfig):
    """The recipe's model section: an MMDiTConfig (from model.preset), the backbone kind and where its weights
    come from."""

    kind: str = "mmdit"
    """Backbone: mmdit (the MMDiTConfig fields) | unet (diffusers' UNet2DConditionModel, flowmatch/models/unet.py)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """The U-Net's layout, used when kind is unet (its patch_size should be the U-Net's downsampling factor)."""

    init_from: Optional[str] = None
    """Start from these weights instead of a random init, at step 0 with a fresh optimizer: a diffusers pipeline
    or transformer folder, a hub id, an original single-file .safetensors, or a flowmatch run or checkpoint
    directory; the architecture is read from them (flowmatch.init_from)."""
    lora: Optional[LoraConfig] = None
    """Train LoRA adapters on the frozen init_from weights instead of the weights themselves; null = full training."""

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):  # presets and asdict() round trips hand the section over as a mapping
            self.unet = UNetConfig(**self.unet)
        if self.kind not in MODEL_KINDS:
            raise choice_error("model.kind", self.kind, MODEL_KINDS)
        if self.kind != "mmdit" and (self.init_from or self.lora is not None):
            # init_from reads the architecture and weights of MMDiT checkpoints and pipelines; LoRA targets name
            # the MMDiT's layers.
            raise ValueError(f"model.init_from and model.lora load and adapt MMDiT weights; model.kind: {self.kind} "
                             "trains from its random init: remove model.init_from / model.lora, or use "
                             "model.kind: mmdit")
        if self.lora is not None and not self.init_from:
            raise ValueError("model.lora adapts existing weights: set model.init_from (a pipeline, transformer, "
                             "single file or flowmatch run) or remove model.lora to train all weights")

    def architecture(self) -> MMDiTConfig:
        """The plain MMDiTConfig the model is built from."""
        return MMDiTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MMDiTConfig)})
