"""The batch the loader hands the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from flowmatch.conditioning import Conditioning


@dataclass
class Batch:
    """One batch, all of one shape (one bucket).

    Raw shards fill `images` (B, C, H, W) float32 in [-1, 1] (flowmatch.data.pixels); cached shards fill `latents`
    (B, c, h, w) float32 (already scaled and shifted by the autoencoder preset) and `text`, a Conditioning (hidden
    (B, L, D) zero-padded to the longest caption of the batch, mask (B, L) bool True = real token, pooled (B, Dp)),
    or, from features of several text encoders, `text_parts`: one such Conditioning per encoder, by name, which the
    encoders combine (flowmatch.encoders.combine). `captions` and `keys` are always there; B can be smaller than the
    batch size at the end of an epoch or when samples were bad. Paired (editing) data adds the reference images:
    `ref_images` (B, R, C, H, W) in [-1, 1] from raw shards, `ref_latents` (B, R, c, h, w) from cached ones; every
    sample of a batch has the same number R of references (the loader groups by it), and the captions are the
    instructions.
    """

    captions: list[str]
    keys: list[str]
    images: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    text: Optional[Conditioning] = None
    meta: list[dict] = field(default_factory=list)
    """Per-sample JSON metadata when the shard stores it (e.g. the digits' {"label": 7}), else empty dicts."""
    text_parts: Optional[dict[str, Conditioning]] = None
    """Each text encoder's cached output by name, when the features hold several."""
    ref_images: Optional[torch.Tensor] = None
    """(B, R, C, H, W) float32 in [-1, 1]: the reference images of paired raw samples, at the target's size."""
    ref_latents: Optional[torch.Tensor] = None
    """(B, R, c, h, w) float32: the cached reference latents of paired samples."""
    masks: Optional[torch.Tensor] = None
    """(B, 1, H, W) float32 in [0, 1]: where each sample's loss counts (its mask.png or alpha channel; ones for a
    sample without), None when no sample of the batch has one (the loss counts everywhere)."""

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, *, non_blocking: bool = True) -> "Batch":
        """Move the tensors (non-blocking: batches come pinned from the loader when CUDA is available)."""

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        text = None if self.text is None else self.text.to(device, non_blocking=non_blocking)
        parts = None if self.text_parts is None else {
            n: c.to(device, non_blocking=non_blocking) for n, c in self.text_parts.items()}
        return replace(self, images=move(self.images), latents=move(self.latents), text=text, text_parts=parts,
                       ref_images=move(self.ref_images), ref_latents=move(self.ref_latents), masks=move(self.masks))

    def pin_memory(self) -> "Batch":
        """Page-locked copy; torch's DataLoader calls this from its pin-memory thread."""

        def pin(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.pin_memory()

        text = None if self.text is None else self.text.pin_memory()
        parts = None if self.text_parts is None else {n: c.pin_memory() for n, c in self.text_parts.items()}
        return replace(self, images=pin(self.images), latents=pin(self.latents), text=text, text_parts=parts,
                       ref_images=pin(self.ref_images), ref_latents=pin(self.ref_latents), masks=pin(self.masks))
