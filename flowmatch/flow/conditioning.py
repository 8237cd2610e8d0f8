"""Text conditioning as batch-first containers: padding two encodings to one length, stacking, caption dropout.

A condition is a dict such as ``{"context": (B, L, D), "pooled": (B, Dp), "context_mask": (B, L) bool}`` or a
dataclass with tensor fields (``flowmatch.encoders.text.TextEmbeddings``). Token tensors of two encodings may
differ in length L (different padding); they are padded to the longer one with zeros, and masks with False, so
padding stays masked out.

Caption dropout (:func:`drop_captions`) is the training half of classifier-free guidance (Ho & Salimans 2022): rows
are swapped for the empty caption's encoding, the same one :func:`flowmatch.sampling.guided_velocity` uses as the
unconditional input at sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["concat_conditions", "drop_captions"]

C = TypeVar("C")


def _as_dict(container: Any) -> dict[str, Any]:
    if isinstance(container, Mapping):
        return dict(container)
    if dataclasses.is_dataclass(container) and not isinstance(container, type):
        return {f.name: getattr(container, f.name) for f in dataclasses.fields(container)}
    raise TypeError(f"expected a dict or dataclass of tensors; got {type(container).__name__}")


def _like(container: C, values: dict[str, Any]) -> C:
    if isinstance(container, Mapping):
        return values  # type: ignore[return-value]
    return dataclasses.replace(container, **values)  # type: ignore[type-var]


def _is_mask(x: Tensor) -> bool:
    return x.ndim == 2 and not x.is_floating_point()


def _is_token_tensor(x: Tensor) -> bool:
    """Tensors with a token axis at dim 1: hidden states (B, L, D) and masks (B, L) of bool/integer dtype."""
    return x.ndim >= 3 or _is_mask(x)


def _match_lengths(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pad token tensors of ``a`` and ``b`` along dim 1 to a common length (zeros; False for masks)."""
    if a.keys() != b.keys():
        raise ValueError(f"conditions have different fields: {sorted(a)} vs {sorted(b)}")
    a, b = dict(a), dict(b)
    padded = False
    for key, x in a.items():
        y = b[key]
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape[1:] == y.shape[1:]:
            continue
        if not (_is_token_tensor(x) and x.ndim == y.ndim and x.shape[2:] == y.shape[2:]):
            raise ValueError(
                f"field {key!r} has per-example shapes {tuple(x.shape[1:])} and {tuple(y.shape[1:])}; only the "
                "token length (dim 1) of hidden states and masks may differ"
            )
        length = max(x.shape[1], y.shape[1])
        a[key], b[key] = (torch.nn.functional.pad(z, _pad_spec(z, length)) for z in (x, y))
        padded = True
    if padded and not any(isinstance(x, Tensor) and _is_mask(x) for x in a.values()):
        raise ValueError(
            "token lengths differ but no mask (B, L) bool tensor is present: padding would be attended to; "
            "encode both captions to the same length or pass the attention mask"
        )
    return a, b


def _pad_spec(z: Tensor, length: int) -> tuple[int, ...]:
    # F.pad lists (left, right) pairs from the last dimension backwards; pad only the right end of dim 1.
    return (0, 0) * (z.ndim - 2) + (0, length - z.shape[1])


def concat_conditions(cond: C, uncond: C) -> C:
    """Stack two conditions along the batch: result rows [0, B) are ``cond``, [B, 2B) are ``uncond``.

    ``uncond`` may have batch 1 (one empty-caption encoding), which is expanded to B. Non-tensor fields must be
    equal and are kept as they are.
    """
    a, b = _match_lengths(_as_dict(cond), _as_dict(uncond))
    out: dict[str, Any] = {}
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, Tensor):
            if x != y:
                raise ValueError(f"non-tensor field {key!r} differs between the conditions: {x!r} vs {y!r}")
            out[key] = x
            continue
        if y.shape[0] == 1 and x.shape[0] != 1:
            y = y.expand(x.shape[0], *y.shape[1:])
        out[key] = torch.cat([x, y.to(x.device)], dim=0)
    return _like(cond, out)


def drop_captions(
    text: C,
    null_text: C,
    p: float,
    *,
    generator: torch.Generator | None = None,
) -> C:
    """Replace a random subset of rows of ``text`` by the empty caption's encoding ``null_text``.

    Each of the B rows is dropped independently with probability ``p`` (``FlowConfig.caption_dropout``).
    ``null_text`` has batch 1 (broadcast) or B. Token tensors are padded to the longer of the two lengths first
    (zeros; masks False). The draw uses ``generator`` on its own device (a CPU generator gives the same rows
    on any device) and makes no host synchronisation. Returns a container of the same type as ``text``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1]; got {p}")
    if p == 0.0:
        return text
    a, b = _match_lengths(_as_dict(text), _as_dict(null_text))
    first = next(x for x in a.values() if isinstance(x, Tensor))
    batch, device = first.shape[0], first.device
    draw_device = generator.device if generator is not None else device
    drop = (torch.rand(batch, generator=generator, device=draw_device) < p).to(device)
    out: dict[str, Any] = {}
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, Tensor):
            out[key] = x
            continue
        if y.shape[0] not in (1, batch):
            raise ValueError(f"null_text field {key!r} has batch {y.shape[0]}; expected 1 or {batch}")
        keep_shape = (batch,) + (1,) * (x.ndim - 1)
        out[key] = torch.where(drop.reshape(keep_shape), y.to(device=device, dtype=x.dtype), x)
    return _like(text, out)
