"""Key maps between flowmatch's MMDiT state dict and another layout (diffusers', or a release's original keys),
written once per architecture as a list of :class:`Rule` and applied in both directions by :func:`to_ours` and
:func:`to_theirs`.

Every transformation is exact (a copy, a concatenation, a split, a swap of halves, a permutation), so a
conversion there and back reproduces each tensor bit for bit. Some of their tensors never reach an output (the
text queries of SD3's last block, the stored SD3 position table); flowmatch's model has no place for them, so
:func:`to_ours` returns them separately, *inert*, and :func:`to_theirs` writes back the ones it is given and a
neutral value (zeros, ones, the computed table) for the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


class Op:
    """How one of our tensors is made of their tensors (`to_ours`) and back (`to_theirs`)."""

    def to_ours(self, parts: list[Tensor]) -> Optional[Tensor]:
        return parts[0]

    def inert(self, parts: list[Tensor]) -> Optional[Tensor]:
        """The part of their tensors that our tensor does not hold (kept for the way back), or None."""
        return None

    def to_theirs(self, value: Optional[Tensor], inert: Optional[Tensor], dtype: torch.dtype) -> list[Tensor]:
        return [value]


class Copy(Op):
    """The same tensor on both sides (no copy is made: the result shares memory with the source)."""


@dataclass(frozen=True)
class Stack(Op):
    """Ours is their tensors concatenated along rows, in order (separate Q, K, V projections -> one fused QKV)."""

    sizes: tuple[int, ...]

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=0)

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        return [piece.clone() for piece in value.split(self.sizes, dim=0)]


class SwapHalves(Op):
    """Their (scale, shift) rows are our (shift, scale): adaLN layers that only shift and scale, in diffusers."""

    @staticmethod
    def _swap(x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        return self._swap(parts[0])

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        return [self._swap(value)]


@dataclass(frozen=True)
class ConvPatch(Op):
    """Their patch embedding is a strided conv kernel (D, C, p, p); ours a linear over (p_row, p_col, C) features."""

    patch: int
    channels: int

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        kernel = parts[0]
        return kernel.permute(0, 2, 3, 1).reshape(kernel.shape[0], self.patch * self.patch * self.channels)

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        p = self.patch
        return [value.reshape(value.shape[0], p, p, self.channels).permute(0, 3, 1, 2).contiguous()]


@dataclass(frozen=True)
class Packed(Op):
    """FLUX packs 2x2 latent patches as (C, p_row, p_col) features; ours are (p_row, p_col, C).

    `axis` is where the features are: 1 for the input projection's columns, 0 for the output projection's rows
    (and its bias).
    """

    patch: int
    channels: int
    axis: int

    def _permute(self, x: Tensor, src: tuple[int, int, int], dst_order: tuple[int, int, int]) -> Tensor:
        lead, rest = x.shape[:self.axis], x.shape[self.axis + 1:]
        y = x.reshape(*lead, *src, *rest)
        order = list(range(x.ndim + 2))
        a = self.axis
        order[a:a + 3] = [a + i for i in dst_order]
        return y.permute(order).reshape(x.shape)

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        p, c = self.patch, self.channels
        return self._permute(parts[0], (c, p, p), (1, 2, 0))  # (C, pr, pc) -> (pr, pc, C)

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        p, c = self.patch, self.channels
        return [self._permute(value, (p, p, c), (2, 0, 1))]  # (pr, pc, C) -> (C, pr, pc)


@dataclass(frozen=True)
class Tail(Op):
    """Ours is their tensor without its first `head` rows, which never reach an output (kept inert): the query
    rows of the fused QKV of SD3's context-pre-only text stream in the original layout."""

    head: int

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        return parts[0][self.head:].clone()

    def inert(self, parts: list[Tensor]) -> Tensor:
        return parts[0][:self.head]

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        head = inert if inert is not None else value.new_zeros(self.head, *value.shape[1:])
        return [torch.cat([head.to(value.dtype), value], dim=0)]


@dataclass(frozen=True)
class Inert(Op):
    """Their tensor has no counterpart in our model and never reaches an output; `make(dtype)` gives the neutral
    value written when the original one is not known."""

    make: Callable[[torch.dtype], Tensor]

    def to_ours(self, parts: list[Tensor]) -> None:
        return None

    def inert(self, parts: list[Tensor]) -> Tensor:
        return parts[0]

    def to_theirs(self, value, inert, dtype) -> list[Tensor]:
        return [inert if inert is not None else self.make(dtype)]


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` (None for an inert one) and the tensors of theirs it is made of, through `op`."""

    ours: Optional[str]
    theirs: tuple[str, ...]
    op: Op = Copy()


def linear(ours: str, *theirs: str, op: Op = Copy(), bias_op: Optional[Op] = None, bias: bool = True,
           ) -> list[Rule]:
    """Rules for a linear layer's weight and bias (`bias_op` defaults to `op`; `bias` False: it has none)."""
    weight = Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), op)
    if not bias:
        return [weight]
    return [weight, Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), op if bias_op is None else bias_op)]


def mlp(ours: str, theirs: str, layers: tuple[str, str], bias: bool = True) -> list[Rule]:
    """Rules for a two-layer MLP: our fc1 / fc2 and their two named layers under `theirs`."""
    return (linear(f"{ours}.fc1", f"{theirs}.{layers[0]}", bias=bias)
            + linear(f"{ours}.fc2", f"{theirs}.{layers[1]}", bias=bias))


def norm(ours: str, theirs: str) -> Rule:
    """The rule for a QK-norm scale."""
    return Rule(f"{ours}.weight", (theirs,))


def to_ours(theirs: Mapping[str, Tensor], rules: list[Rule], *, what: str) -> tuple[dict[str, Tensor],
                                                                                      dict[str, Tensor]]:
    """(our state dict, inert tensors keyed by their name) from their state dict. Every tensor of theirs must be
    used by a rule and every rule must find its tensors, or a ValueError names them (`what` says whose)."""
    missing = [k for rule in rules for k in rule.theirs if k not in theirs]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} expected weights, e.g. {missing[:6]}")
    used = {k for rule in rules for k in rule.theirs}
    unused = sorted(set(theirs) - used)
    if unused:
        raise ValueError(f"{what} has {len(unused)} weights with no counterpart in flowmatch's MMDiT, e.g. "
                         f"{unused[:6]}")
    ours: dict[str, Tensor] = {}
    inert: dict[str, Tensor] = {}
    for rule in rules:
        parts = [theirs[k] for k in rule.theirs]
        kept = rule.op.inert(parts)
        if kept is not None:
            inert[rule.theirs[0]] = kept
        if rule.ours is not None:
            ours[rule.ours] = rule.op.to_ours(parts)
    return ours, inert


def to_theirs(ours: Mapping[str, Tensor], rules: list[Rule], inert: Optional[Mapping[str, Tensor]] = None,
              ) -> dict[str, Tensor]:
    """Their state dict from ours; `inert` gives back what :func:`to_ours` set aside (neutral values otherwise)."""
    inert = inert or {}
    dtype = next(iter(ours.values())).dtype
    out: dict[str, Tensor] = {}
    for rule in rules:
        value = ours[rule.ours] if rule.ours is not None else None
        out.update(zip(rule.theirs, rule.op.to_theirs(value, inert.get(rule.theirs[0]), dtype)))
    return out
