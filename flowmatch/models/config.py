"""The recipe's `model` section: the MMDiT's architecture, the weights it starts from, and its LoRA adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from flowmatch.models.lora import LoraConfig
from flowmatch.models.mmdit import MMDiTConfig

#: MMDiTConfig fields that describe the network (all but the preset's name).
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(MMDiTConfig) if f.name != "preset")


@dataclass
class ModelConfig(MMDiTConfig):
    """The recipe's model section: an MMDiTConfig (from model.preset) and where its weights come from."""

    init_from: Optional[str] = None
    """Start from these weights instead of a random init, at step 0 with a fresh optimizer: a diffusers pipeline
    or transformer folder, a hub id, an original single-file .safetensors, or a flowmatch run or checkpoint
    directory; the architecture is read from them (flowmatch.init_from)."""
    lora: Optional[LoraConfig] = None
    """Train LoRA adapters on the frozen init_from weights instead of the weights themselves; null = full training."""

    def __post_init__(self) -> None:
        if self.lora is not None and not self.init_from:
            raise ValueError("model.lora adapts existing weights: set model.init_from (a pipeline, transformer, "
                             "single file or flowmatch run) or remove model.lora to train all weights")

    def architecture(self) -> MMDiTConfig:
        """The plain MMDiTConfig the model is built from."""
        return MMDiTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MMDiTConfig)})
