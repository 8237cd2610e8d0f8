"""Exponential moving average (EMA) of training weights, kept in fp32.

``ema <- decay * ema + (1 - decay) * weight`` after every applied optimizer step.

This module holds only the arithmetic over a list of tensors; which tensors those are is the engine's business
(:class:`flowmatch.engine.Engine`): the full parameters when every rank holds the whole model (ZeRO 0-2), or
only the local partition of each parameter under ZeRO-3, so that the average costs no communication per step
and is gathered only when a checkpoint is written.

timm's ``ModelEmaV3`` (the usual choice) keeps a deep copy of the whole module. Under ZeRO-3 that copy would be
partitioned as well and every update would need a gather, so the shadow tensors here are plain tensors that
mirror whatever the engine hands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_decay(decay: float) -> float:
    """Return ``decay`` as a float after checking it lies in [0, 1]; 1 freezes the average, 0 copies."""
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1] (typical: 0.999-0.9999), got {decay}")
    return decay


class ShadowEma:
    """fp32 shadow copies of a fixed list of working tensors, updated in place.

    Args:
        sources: the working tensors (any floating dtype, any shape); the shadow starts as an fp32 copy.
        decay: weight of the old average in each update, in [0, 1].
    """

    def __init__(self, sources: Sequence[torch.Tensor], decay: float) -> None:
        self.decay = check_decay(decay)
        self.shadow: list[torch.Tensor] = [s.detach().to(torch.float32, copy=True) for s in sources]

    @torch.no_grad()
    def update(self, sources: Sequence[torch.Tensor], decay: float | None = None) -> None:
        """Blend ``sources`` into the shadow: ``shadow <- d * shadow + (1 - d) * source``.

        Args:
            sources: the same tensors (same order, shapes) the shadow was built from, at their current values.
            decay: overrides the stored decay for this update (e.g. a warmup schedule of the decay).
        """
        d = self.decay if decay is None else check_decay(decay)
        if len(sources) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(sources)}")
        if not self.shadow:
            return
        # lerp(shadow, src, w) = shadow + w * (src - shadow): one fused kernel per device over all tensors.
        src32 = [s.detach().to(torch.float32) for s in sources]
        torch._foreach_lerp_(self.shadow, src32, 1.0 - d)

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace the shadow values (shapes must match), e.g. when resuming from a checkpoint."""
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(tensors)} to load")
        for dst, src in zip(self.shadow, tensors):
            if dst.shape != src.shape:
                raise ValueError(f"EMA tensor of shape {tuple(dst.shape)} cannot load one of shape {tuple(src.shape)}")
            dst.copy_(src)
