"""How several text encoders' outputs become the one :class:`Conditioning` the model takes, as diffusers'
pipelines combine them, and where each encoder's share of it lies (for per-encoder caption dropout).

Each layout is an object (:class:`SingleLayout`, :class:`TextLayout`); the families declare theirs
(``flowmatch/families/<family>/__init__.py``) and ``text_encoders.combine`` names one
(:func:`flowmatch.families.text_layout`):

- ``single``: one encoder's output as it is.
- ``sd3`` (``StableDiffusion3Pipeline.encode_prompt``): the CLIP encoders' states (each run with
  ``hidden_layer=-2``) concatenated along the width in recipe order (768 + 1280 = 2048 for CLIP-L and CLIP-G),
  zero-padded to the T5 width (4096), then the T5 states appended along the sequence (77 + 256 tokens); pooled =
  the CLIP pooled vectors concatenated (their projections, 2048). T5's pooled vector is unused.
- ``flux`` (``FluxPipeline.encode_prompt``): pooled = the CLIP encoder's pooled output (768), context = the T5
  states (512 tokens).

Only torch is needed, so the loader can combine cached per-encoder features the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import torch

from flowmatch.conditioning import Conditioning


@dataclass(frozen=True)
class TextPart:
    """Where one encoder's output lies in a combined conditioning: token positions, hidden channels and pooled
    channels (Python slices; ``None`` bounds mean to the end, a variable length)."""

    name: str
    tokens: slice
    hidden: slice
    pooled: slice


@dataclass(frozen=True)
class EncoderShape:
    """What the combination needs to know of one encoder: its kind (t5, clip, auto), token count (None when it
    varies with the captions), hidden and pooled widths."""

    kind: str
    tokens: int | None
    hidden: int
    pooled: int


@dataclass(frozen=True)
class SingleLayout:
    """One encoder's output as it is (``text_encoders.combine: single``)."""

    name: str = "single"
    single: bool = True
    """Whether the layout takes exactly one encoder, whose output is the conditioning."""

    def sizes(self, shapes: Mapping[str, EncoderShape]) -> tuple[int, int]:
        """(context width, pooled width) of the conditioning."""
        (only,) = shapes.values()
        return only.hidden, only.pooled

    def parts(self, shapes: Mapping[str, EncoderShape]) -> list[TextPart]:
        """The one encoder's output is all of it."""
        everything = slice(None)
        (name,) = shapes
        return [TextPart(name, everything, everything, everything)]

    def combine(self, outputs: Mapping[str, Conditioning], kinds: Mapping[str, str]) -> Conditioning:
        (cond,) = outputs.values()
        return cond


@dataclass(frozen=True)
class TextLayout:
    """CLIP encoders and one T5 combined as a diffusers pipeline combines them; a family declares its own
    (``flowmatch.families``: SD3's and FLUX's), named as the family for ``text_encoders.combine``.

    Pooled = the CLIP pooled vectors concatenated (T5's pooled vector is unused); context = the T5 states,
    preceded, when ``clip_states``, by the CLIP states side by side along the width, zero-padded to the T5 width.
    The mask is the first CLIP's then T5's (or T5's alone).
    """

    name: str
    """The family whose pipeline combines so (``text_encoders.combine``)."""
    clip_states: bool
    """The CLIP hidden states join the context before T5's tokens (SD3); else only their pooled vectors (FLUX)."""
    one_clip: bool
    """Exactly one CLIP encoder (FLUX); else one or more (SD3: CLIP-L and CLIP-G)."""
    single: bool = False

    def _roles(self, shapes: Mapping[str, EncoderShape]) -> tuple[list[str], str]:
        """(CLIP encoder names in order, the T5 encoder's name); ValueError naming what is missing."""
        clips = [n for n, s in shapes.items() if s.kind == "clip"]
        t5s = [n for n, s in shapes.items() if s.kind == "t5"]
        want_clips = "exactly one" if self.one_clip else "one or more"
        if len(t5s) != 1 or not clips or (self.one_clip and len(clips) != 1) or len(clips) + 1 != len(shapes):
            raise ValueError(f"text_encoders.combine={self.name} needs {want_clips} encoders of kind clip and one of "
                             f"kind t5, got {', '.join(f'{n} ({s.kind})' for n, s in shapes.items())}")
        fixed = [n for n in (*clips, *t5s) if shapes[n].tokens is None]
        if fixed:
            raise ValueError(f"text_encoders.combine={self.name} needs padding=max_length on every encoder, as the "
                             f"pipelines run them: set text_encoders.encoders.{fixed[0]}.padding=max_length")
        lengths = {shapes[n].tokens for n in clips}
        if len(lengths) > 1:
            raise ValueError(f"text_encoders.combine={self.name}: the CLIP encoders' states lie side by side, so "
                             f"their max_length must agree, got {', '.join(f'{n}={shapes[n].tokens}' for n in clips)}")
        return clips, t5s[0]

    def sizes(self, shapes: Mapping[str, EncoderShape]) -> tuple[int, int]:
        """(context width, pooled width) of the combined conditioning."""
        clips, t5 = self._roles(shapes)
        pooled = sum(shapes[n].pooled for n in clips)
        if not self.clip_states:
            return shapes[t5].hidden, pooled
        clip_width = sum(shapes[n].hidden for n in clips)
        if clip_width > shapes[t5].hidden:
            raise ValueError(f"text_encoders.combine={self.name}: the CLIP states ({clip_width} wide) are wider than "
                             f"the T5 states ({shapes[t5].hidden}) they are zero-padded to")
        return shapes[t5].hidden, pooled

    def parts(self, shapes: Mapping[str, EncoderShape]) -> list[TextPart]:
        """Where each encoder's output lies in the combined conditioning, in the encoders' order."""
        everything, none = slice(None), slice(0, 0)
        clips, t5 = self._roles(shapes)
        if not self.clip_states:
            return [TextPart(clips[0], none, none, everything), TextPart(t5, everything, everything, none)]
        clip_tokens = shapes[clips[0]].tokens
        out, width, pooled = [], 0, 0
        for name in clips:
            s = shapes[name]
            out.append(TextPart(name, slice(0, clip_tokens), slice(width, width + s.hidden),
                                slice(pooled, pooled + s.pooled)))
            width, pooled = width + s.hidden, pooled + s.pooled
        out.append(TextPart(t5, slice(clip_tokens, None), everything, none))
        return out

    def combine(self, outputs: Mapping[str, Conditioning], kinds: Mapping[str, str]) -> Conditioning:
        clips = [n for n in kinds if kinds[n] == "clip"]
        t5 = outputs[next(n for n in kinds if kinds[n] == "t5")]
        if not self.clip_states:
            return Conditioning(t5.hidden, t5.mask, outputs[clips[0]].pooled, all_valid=t5.all_valid)
        clip_hidden = torch.cat([outputs[n].hidden for n in clips], dim=-1)  # (B, 77, sum of CLIP widths)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5.hidden.shape[-1] - clip_hidden.shape[-1]))
        return Conditioning(torch.cat([clip_hidden, t5.hidden], dim=1),  # (B, 77 + L_t5, D_t5)
                            torch.cat([outputs[clips[0]].mask, t5.mask], dim=1),
                            torch.cat([outputs[n].pooled for n in clips], dim=-1),
                            all_valid=outputs[clips[0]].all_valid and t5.all_valid)


#: The layout of one encoder; the several-encoder layouts are the families' (flowmatch.families.text_layout).
SINGLE = SingleLayout()
Layout = Union[SingleLayout, TextLayout]


def combined_sizes(layout: Layout, shapes: Mapping[str, EncoderShape]) -> tuple[int, int]:
    """(context width, pooled width) of the combined conditioning."""
    return layout.sizes(shapes)


def parts(layout: Layout, shapes: Mapping[str, EncoderShape]) -> list[TextPart]:
    """Where each encoder's output lies in the combined conditioning, in the encoders' order."""
    return layout.parts(shapes)


def combine_outputs(layout: Layout, outputs: Mapping[str, Conditioning], kinds: Mapping[str, str],
                    guidance: float | None = None) -> Conditioning:
    """Per-encoder conditionings -> the model's conditioning. ``kinds`` names each encoder's kind in the order of
    combination (the recipe's; ``outputs`` may come in another, e.g. from cached features). ``guidance``
    (FLUX-dev's embedded guidance value) is added as ``extra["guidance"]`` (B,) when given."""
    if set(outputs) != set(kinds):
        raise ValueError(f"text encoder outputs {sorted(outputs)} are not those of the encoders {list(kinds)}")
    cond = layout.combine(outputs, kinds)
    if guidance is None:
        return cond
    return cond.with_extra({**cond.extra, "guidance": cond.pooled.new_full((len(cond),), float(guidance))})
