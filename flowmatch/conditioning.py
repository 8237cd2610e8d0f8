"""The one conditioning type: what the frozen encoders produce and the model consumes.

It sits on the bottom floor (beside errors and dtypes): data/, encoders/, models/, flow/ and sampling/ import it,
and it imports nothing of the package.

A :class:`Conditioning` travels unchanged from the encoders (or the cached features the loader reads) through the
trainer, caption dropout, classifier-free guidance and the model. It owns the only code that pads token
sequences to a common length, stacks rows and concatenates batches, so that padding is always zeros in
``hidden`` and False in ``mask`` and is never attended to.

Fields (B = batch, L = text tokens, D = hidden width, Dp = pooled width)::

    hidden  (B, L, D) float   per-token states of the text encoder(s), zero at padded positions
    mask    (B, L)    bool    True = real token
    pooled  (B, Dp)   float   one vector per caption
    extra   {name: (B, ...)}  further per-sample model inputs (e.g. a guidance value), batch-first
    reference ((B, C, h_k, w_k), ...)  clean reference-image latents (image editing), one tensor per reference
    all_valid  bool           a host-side fact: every mask entry is True (no token is padding)

The references travel with the image, not with the caption: they are latents of the same autoencoder as the
target, normalised the same way (``Autoencoder.encode``: ``(z - shift) * scale``), never noised. Dropping a
caption (:meth:`where`) keeps them, and the unconditional input of classifier-free guidance is the empty caption
*with the references* (:meth:`unconditional`): an editing model's unconditional pass still sees the image it
edits. A batch has one reference count and one size per reference; samples with other counts or sizes go in
other batches (grouped, never padded). ``()`` is a model input without references (text-to-image).

``all_valid`` lets the model pass no mask to attention, which is what makes the flash kernels of
``scaled_dot_product_attention`` eligible on CUDA (a boolean or float mask rules them out). It is decided where the
mask is made, from what the host already knows (the text padding policy, the rows' lengths), and carried through
every operation here; it is never found by reading the mask back from the device. False is always correct (the
mask is then used as it is); True promises that the mask is all True.

This module needs only torch, so the model, the loader and the flow math can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """A batch of conditioning inputs; see the module docstring for shapes."""

    hidden: Tensor
    mask: Tensor
    pooled: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)
    reference: tuple[Tensor, ...] = ()
    all_valid: bool = False
    """Every mask entry is True, known on the host (see the module docstring); False = use the mask."""

    def __post_init__(self) -> None:
        b, length = self.hidden.shape[:2]
        if self.mask.shape != (b, length) or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool ({b}, {length}) like hidden's first two dims, got "
                             f"{self.mask.dtype} {tuple(self.mask.shape)}")
        if self.pooled.ndim != 2 or self.pooled.shape[0] != b:
            raise ValueError(f"pooled must be ({b}, Dp), got {tuple(self.pooled.shape)}")
        for name, value in self.extra.items():
            if value.shape[:1] != (b,):
                raise ValueError(f"extra input {name!r} must be batch-first with batch {b}, got {tuple(value.shape)}")
        self.reference = tuple(self.reference)
        for k, ref in enumerate(self.reference):
            if ref.ndim != 4 or ref.shape[0] != b or not ref.is_floating_point():
                raise ValueError(f"reference {k} must be float latents (B={b}, C, h, w), got {ref.dtype} "
                                 f"{tuple(ref.shape)}")

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        """L, the token length (real tokens plus padding)."""
        return self.hidden.shape[1]

    def _map(self, fn) -> "Conditioning":
        """Apply ``fn`` to every tensor (hidden, mask, pooled, extras, references)."""
        return Conditioning(fn(self.hidden), fn(self.mask), fn(self.pooled), {k: fn(v) for k, v in self.extra.items()},
                            tuple(fn(r) for r in self.reference), all_valid=self.all_valid)

    def rows(self, n: int) -> "Conditioning":
        """The first ``n`` rows (references included)."""
        return self._map(lambda x: x[:n])

    def with_reference(self, reference: Sequence[Tensor]) -> "Conditioning":
        """The same caption inputs with ``reference`` (each (B, C, h_k, w_k)) as the reference latents."""
        return replace(self, extra=dict(self.extra), reference=tuple(reference))

    def with_extra(self, extra: dict[str, Tensor]) -> "Conditioning":
        """The same conditioning with the extra inputs ``extra`` instead of its own."""
        return replace(self, extra=dict(extra))

    def unconditional(self, null: "Conditioning") -> "Conditioning":
        """The unconditional input matching this batch: ``null`` (the empty caption, batch 1 or B) expanded to
        this batch, with this batch's references (classifier-free guidance drops the caption, not the image)."""
        return null.expand(len(self)).with_reference(self.reference)

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None, *,
           non_blocking: bool = False) -> "Conditioning":
        """Move to ``device``; ``dtype`` applies to the floating tensors only (the mask stays bool)."""

        def move(x: Tensor) -> Tensor:
            cast = dtype if dtype is not None and x.is_floating_point() else None
            return x.to(device=device, dtype=cast, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> "Conditioning":
        """Page-locked copy (the loader's pin-memory thread calls this)."""
        return self._map(Tensor.pin_memory)

    def pad_to(self, length: int) -> "Conditioning":
        """Right-pad the token axis to ``length`` (zeros in hidden, False in mask)."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"cannot pad {self.length} tokens down to {length}")
        if extra == 0:
            return self
        hidden = torch.nn.functional.pad(self.hidden, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(self.mask, (0, extra), value=False)
        # the new positions are padding, so all_valid is False
        return Conditioning(hidden, mask, self.pooled, dict(self.extra), self.reference)

    def expand(self, batch: int) -> "Conditioning":
        """A batch-1 conditioning repeated to ``batch`` rows (a view); a batch of ``batch`` rows as it is."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {batch}: only batch 1 expands")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch, right-padding every item to the longest token length. References are
        never padded: every item must carry as many references, of the same sizes (group samples first)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        keys = set(items[0].extra)
        if any(set(c.extra) != keys for c in items):
            raise ValueError(f"conditionings carry different extra inputs: {[sorted(c.extra) for c in items]}")
        layouts = [reference_layout(c.reference) for c in items]
        if any(layout != layouts[0] for layout in layouts):
            raise ValueError(f"conditionings carry different references (count, then (C, h, w) each): {layouts}; "
                             "batch samples with the same reference count and sizes together instead of padding")
        length = max(c.length for c in items)
        padded = [c.pad_to(length) for c in items]
        device = padded[0].hidden.device
        return Conditioning(
            torch.cat([c.hidden.to(device) for c in padded]),
            torch.cat([c.mask.to(device) for c in padded]),
            torch.cat([c.pooled.to(device) for c in padded]),
            {k: torch.cat([c.extra[k].to(device) for c in padded]) for k in sorted(keys)},
            tuple(torch.cat([c.reference[k].to(device) for c in padded]) for k in range(len(layouts[0]))),
            all_valid=all(c.all_valid for c in padded),
        )

    @staticmethod
    def from_rows(hidden: Sequence[Tensor], pooled: Sequence[Tensor]) -> "Conditioning":
        """Stack per-caption rows (hidden (n_i, D), pooled (Dp,)) into float32 (B, L = max n_i (at least 1), D).

        Rows are converted while copied into one preallocated batch: cached features are bf16/fp16, and converting
        each row first would cost a second full pass over the largest tensor of the batch.
        """
        length = max(1, max(h.shape[0] for h in hidden))
        out = torch.zeros(len(hidden), length, hidden[0].shape[1], dtype=torch.float32)
        mask = torch.zeros(len(hidden), length, dtype=torch.bool)
        for i, h in enumerate(hidden):
            out[i, :h.shape[0]].copy_(h)
            mask[i, :h.shape[0]] = True
        # All rows of one length (cached features of a fixed-length encoder) leave no padding: known from shapes.
        all_valid = all(h.shape[0] == length for h in hidden)
        return Conditioning(out, mask, torch.stack(list(pooled)).float(), all_valid=all_valid)

    def where(self, replace: Tensor, other: "Conditioning") -> "Conditioning":
        """Rows i with ``replace[i]`` True taken from ``other`` (batch 1, broadcast, or B), the rest from self;
        the references are always self's (caption dropout swaps the caption, never the image being edited).

        Both are padded to the longer token length first. ``replace`` is a (B,) bool tensor on any device; no
        host synchronisation happens.
        """
        if set(other.extra) != set(self.extra):
            raise ValueError(f"extra inputs differ: {sorted(self.extra)} vs {sorted(other.extra)}")
        b = len(self)
        if len(other) not in (1, b):
            raise ValueError(f"the replacement conditioning has batch {len(other)}; expected 1 or {b}")
        length = max(self.length, other.length)
        a, o = self.pad_to(length), other.pad_to(length)
        device = a.hidden.device
        replace = replace.to(device)

        def pick(x: Tensor, y: Tensor) -> Tensor:
            return torch.where(replace.reshape((b,) + (1,) * (x.ndim - 1)), y.to(device=device, dtype=x.dtype), x)

        return Conditioning(pick(a.hidden, o.hidden), pick(a.mask, o.mask), pick(a.pooled, o.pooled),
                            {k: pick(v, o.extra[k]) for k, v in a.extra.items()}, self.reference,
                            all_valid=a.all_valid and o.all_valid)


def reference_layout(reference: Sequence[Tensor]) -> tuple[tuple[int, ...], ...]:
    """(C, h, w) of each reference: what must agree between samples of one batch (the grouping key)."""
    return tuple(tuple(r.shape[1:]) for r in reference)
