"""Caption dropout: the training half of classifier-free guidance (Ho & Salimans 2022).

Rows of a batch's conditioning are swapped for the empty caption's conditioning, the same one
:func:`flowmatch.sampling.guided_velocity` uses as the unconditional input at sampling.
"""

from __future__ import annotations

import torch

from flowmatch.encoders.conditioning import Conditioning

__all__ = ["drop_captions"]


def drop_captions(cond: Conditioning, null: Conditioning, p: float, *,
                  generator: torch.Generator | None = None) -> Conditioning:
    """Replace each row of ``cond`` by ``null`` (batch 1 or B) independently with probability ``p``.

    ``p`` is ``FlowConfig.caption_dropout``. The draw uses ``generator`` on its own device (a CPU generator gives
    the same rows on any device) and makes no host synchronisation. ``p == 0`` returns ``cond`` itself.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1]; got {p}")
    if p == 0.0:
        return cond
    draw_device = generator.device if generator is not None else cond.hidden.device
    drop = torch.rand(len(cond), generator=generator, device=draw_device) < p
    return cond.where(drop, null)
