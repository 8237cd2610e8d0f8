"""Caption dropout: the training half of classifier-free guidance (Ho & Salimans 2022).

Rows of a batch's conditioning are swapped for the empty caption's conditioning, the same one
:func:`flowmatch.sampling.guided_velocity` uses as the unconditional input at sampling. With several text
encoders each encoder's share of the conditioning (a :class:`~flowmatch.encoders.combine.TextPart`) is dropped
independently, with its own probability, as torchtitan's FLUX trainer drops T5 and CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from flowmatch.conditioning import Conditioning
from flowmatch.encoders.combine import TextPart

__all__ = ["drop_captions"]

_WHOLE = slice(None)


def _check(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1]; got {p}")


def _replace_part(cond: Conditioning, rows: torch.Tensor, null: Conditioning, part: TextPart) -> Conditioning:
    """``cond`` with ``part`` of the rows where ``rows`` (B,) is True taken from ``null`` (batch 1 or B)."""
    if part.tokens == part.hidden == part.pooled == _WHOLE:
        return cond.where(rows, null)  # the only encoder: whole rows, token lengths may differ
    if null.length != cond.length:
        raise ValueError(f"per-encoder dropout needs fixed token lengths: the conditioning has {cond.length} tokens, "
                         f"its null {null.length}")
    device = cond.hidden.device
    null = null.expand(len(cond)).to(device)
    rows = rows.to(device)
    tokens = torch.zeros(cond.length, dtype=torch.bool, device=device)
    tokens[part.tokens] = True
    region = torch.zeros(cond.hidden.shape[1:], dtype=torch.bool, device=device)  # (L, D)
    region[part.tokens, part.hidden] = True
    pooled = torch.zeros(cond.pooled.shape[1], dtype=torch.bool, device=device)
    pooled[part.pooled] = True
    return Conditioning(torch.where(rows[:, None, None] & region, null.hidden.to(cond.hidden.dtype), cond.hidden),
                        torch.where(rows[:, None] & tokens, null.mask, cond.mask),
                        torch.where(rows[:, None] & pooled, null.pooled.to(cond.pooled.dtype), cond.pooled),
                        dict(cond.extra), cond.reference, all_valid=cond.all_valid and null.all_valid)


def drop_captions(cond: Conditioning, null: Conditioning, p: float, *, generator: torch.Generator | None = None,
                  parts: Optional[Sequence[tuple[TextPart, float]]] = None) -> Conditioning:
    """Replace each row of ``cond`` by ``null`` (batch 1 or B) independently with probability ``p``; with
    ``parts`` (each encoder's share and its own probability, ``FrozenEncoders.dropout_parts``), each encoder's
    share independently instead, drawn in the parts' order.

    ``p`` is ``FlowConfig.caption_dropout``. The draw uses ``generator`` on its own device (a CPU generator gives
    the same rows on any device) and makes no host synchronisation. Probability 0 draws nothing: ``p == 0``
    without parts returns ``cond`` itself.
    """
    for _, q in parts or [(None, p)]:
        _check(q)
    draw_device = generator.device if generator is not None else cond.hidden.device
    for part, q in parts or [(TextPart("", _WHOLE, _WHOLE, _WHOLE), p)]:
        if q == 0.0:
            continue
        drop = torch.rand(len(cond), generator=generator, device=draw_device) < q
        cond = _replace_part(cond, drop, null, part)
    return cond
