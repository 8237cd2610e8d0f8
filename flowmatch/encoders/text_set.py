"""Several frozen text encoders in one run, each with its own sub-config, combined into the one conditioning the
model takes (:mod:`flowmatch.encoders.combine`: as a single encoder, or as diffusers' SD3 or FLUX pipelines).

A recipe names them in its ``text_encoders`` section::

    text_encoders:
      combine: sd3
      encoders:
        clip_l: {kind: clip, name_or_path: PIPELINE, subfolder: text_encoder, max_length: 77, padding: max_length,
                 hidden_layer: -2, pooling: projection}
        clip_g: {kind: clip, name_or_path: PIPELINE, subfolder: text_encoder_2, ...}
        t5:     {kind: t5, name_or_path: PIPELINE, subfolder: text_encoder_3, max_length: 256, padding: max_length}

(:func:`flowmatch.encoders.diffusers_folder.encoder_configs_from_pipeline` writes these from a pipeline folder.)
A recipe without ``text_encoders.encoders`` uses its ``text_encoder`` section as the only encoder, named
:data:`SINGLE`, so recipes and cached features from before keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.encoders.combine import EncoderShape, TextPart, combine_outputs, combined_sizes, parts
from flowmatch.encoders.decoder_llm import DecoderLLMEncoder
from flowmatch.encoders.text import TextEncoder, TextEncoderConfig
from flowmatch.families import text_layout

#: The name of a recipe's only encoder when it comes from the ``text_encoder`` section.
SINGLE = "text_encoder"
#: The encoder class of each kind that is not a plain TextEncoder.
ENCODER_CLASSES = {"decoder_llm": DecoderLLMEncoder}


def build_text_encoder(cfg: TextEncoderConfig, *, device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen encoder of one sub-config: a decoder LLM behind its chat template, or a T5 / CLIP / AutoModel."""
    return ENCODER_CLASSES.get(cfg.kind, TextEncoder)(cfg, device=device)


@dataclass
class TextEncodersConfig:
    """The recipe's `text_encoders` section (empty = the `text_encoder` section alone)."""

    combine: str = "single"
    """How the encoders' outputs form the model's conditioning: single, or a family's pipeline's combination (sd3,
    flux; flowmatch.families.text_layout, flowmatch.encoders.combine)."""
    encoders: dict[str, TextEncoderConfig] = field(default_factory=dict)
    """The encoders by name, each with its own settings; their order is the order of combination."""
    guidance: Optional[float] = None
    """FLUX-dev's embedded guidance value given to the model in training (1.0 as the diffusers and kohya FLUX LoRA
    docs train it); None for models without a guidance embedding. Sampling uses sampling.guidance_scale."""

    def __post_init__(self) -> None:
        layout = text_layout(self.combine)  # single, or a family's combination (flowmatch.families)
        if layout.single and len(self.encoders) > 1:
            raise ValueError(f"text_encoders.combine=single takes one encoder, got {len(self.encoders)} "
                             f"({', '.join(self.encoders)}); set text_encoders.combine to sd3 or flux")
        if not layout.single:
            # The roles and fixed lengths the combination needs, checked before any encoder loads (widths later).
            parts(layout, {n: EncoderShape(c.kind, c.max_length if c.padding == "max_length" else None, 0, 0)
                                 for n, c in self.encoders.items()})

    def resolved(self, single: TextEncoderConfig) -> "TextEncodersConfig":
        """This section, or the recipe's `text_encoder` section as the only encoder when it names none."""
        if self.encoders:
            return self
        return TextEncodersConfig(combine="single", encoders={SINGLE: single}, guidance=self.guidance)


class TextEncoders:
    """The run's text encoders. ``encode(captions) -> Conditioning`` combined as the recipe says, float32."""

    def __init__(self, cfg: TextEncodersConfig, *, device: torch.device | str = "cpu") -> None:
        if not cfg.encoders:
            raise ValueError("TextEncoders needs at least one encoder: use TextEncodersConfig.resolved")
        self.cfg = cfg
        self.device = torch.device(device)
        self.encoders = {name: build_text_encoder(c, device=self.device) for name, c in cfg.encoders.items()}
        self.kinds = {name: c.kind for name, c in cfg.encoders.items()}
        shapes = {name: EncoderShape(c.kind, c.max_length if c.padding == "max_length" else None,
                                     self.encoders[name].hidden_size, self.encoders[name].pooled_size)
                  for name, c in cfg.encoders.items()}
        self.layout = text_layout(cfg.combine)
        """How the outputs combine: one encoder's as it is, or as a family's pipeline combines them."""
        self.hidden_size, self.pooled_size = combined_sizes(self.layout, shapes)
        self.parts: list[TextPart] = parts(self.layout, shapes)
        """Where each encoder's output lies in the combined conditioning."""
        self._null: Optional[dict[str, Conditioning]] = None
        self._kept: Optional[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = None
        self.single_name: Optional[str] = next(iter(cfg.encoders)) if self.layout.single else None
        """The only encoder's name when there is one, whose cached features are stored unnamed."""

    def encode_each(self, captions: list[str]) -> dict[str, Conditioning]:
        """Every encoder's own output for the captions, by name."""
        if self._kept is None:
            return {name: enc.encode(list(captions)) for name, enc in self.encoders.items()}
        missing = [c for c in captions if c not in self._kept]
        if missing:
            raise RuntimeError(f"the text encoders were freed once the cached features made them unneeded; caption "
                               f"{missing[0]!r} was not encoded before (only the sampling prompts and the empty one)")
        return {name: Conditioning.from_rows([self._kept[c][name][0] for c in captions],
                                             [self._kept[c][name][1] for c in captions]).to(self.device)
                for name in self.encoders}

    def release(self, keep: list[str]) -> None:
        """Encode the captions in `keep` and the empty one, then free every encoder's weights: training on cached
        features needs nothing else from them (a T5-XXL is ~9 GB in bf16). Later calls may ask only for those."""
        kept = {}
        for caption in dict.fromkeys(["", *keep]):
            out = self._empty() if caption == "" else self.encode_each([caption])
            kept[caption] = {n: (c.hidden[0][c.mask[0]], c.pooled[0]) for n, c in out.items()}
        for enc in self.encoders.values():
            enc.release()
        self._kept = kept

    def combine(self, outputs: dict[str, Conditioning]) -> Conditioning:
        """Per-encoder outputs -> the model's conditioning (with the training guidance value, when set)."""
        return combine_outputs(self.layout, outputs, self.kinds, self.cfg.guidance)

    def encode(self, captions: list[str]) -> Conditioning:
        """Captions -> the model's conditioning."""
        return self.combine(self.encode_each(captions))

    def _empty(self) -> dict[str, Conditioning]:
        if self._null is None:
            self._null = self.encode_each([""])
        return self._null

    def null(self) -> Conditioning:
        """The empty caption through every encoder (batch 1): the pipelines' unconditional (negative prompt) input."""
        return self.combine(self._empty())

    def dropout_null(self) -> Conditioning:
        """What training puts in place of a dropped caption (batch 1): per encoder, its encoded empty caption or,
        with ``dropped: zeros``, zeros of its shape."""
        outputs = {name: (Conditioning(torch.zeros_like(c.hidden), c.mask, torch.zeros_like(c.pooled),
                                        all_valid=c.all_valid)
                          if self.cfg.encoders[name].dropped == "zeros" else c)
                   for name, c in self._empty().items()}
        return self.combine(outputs)

    def dropout_parts(self, default: float) -> list[tuple[TextPart, float]]:
        """(where each encoder lies, its caption dropout probability: its own, else ``default``)."""
        probs = {n: default if c.caption_dropout is None else c.caption_dropout for n, c in self.cfg.encoders.items()}
        return [(part, probs[part.name]) for part in self.parts]

    def fingerprints(self) -> dict[str, str]:
        """Each encoder's fingerprint: ``text_encoder`` for a single one, ``text_encoder.NAME`` for several."""
        if self.layout.single:
            (enc,) = self.encoders.values()
            return {SINGLE: enc.fingerprint()}
        return {f"{SINGLE}.{name}": enc.fingerprint() for name, enc in self.encoders.items()}
