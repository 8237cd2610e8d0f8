"""What to change so that a recipe fits: the settings that lower the peak (levers), the largest micro batch that
fits, the cheapest set of levers that fits the recipe's micro batch, and the largest single lever when nothing
fits.

Levers are tried in order of what they cost the run (none first, then compute, then communication, then
precision, then host transfers). ``flowmatch train`` applies only the ones it can set itself (:data:`APPLIED`);
cached features, 8-bit AdamW, a quantised base, quantised text encoders and block swap are the user's to set. A
lever the recipe already sets is not offered again; block swap is offered at the fewest blocks that fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from flowmatch.plan.memory import QUANT_BYTES, ModelCost, Settings, peak

#: Lever kinds: ``flowmatch train`` sets it under distributed.memory_budget_gb; the user sets it (it needs a step
#: of its own, or changes what the run computes).
APPLIED, MANUAL = "applied", "manual"
#: The largest micro batch the planner searches.
MAX_MICRO = 1 << 16


@dataclass(frozen=True)
class Lever:
    """One change of settings that lowers the peak."""

    name: str
    setting: str
    """The recipe key and its value (``{block_swap}``: the settings' value)."""
    change: Callable[[Settings, "Room"], Optional[Settings]]
    """The settings with the lever applied; None where it does not apply (already set, or not possible)."""
    kind: str
    """APPLIED or MANUAL."""
    slow: bool = False
    """It moves state over the host link every step (offload): tried last."""

    def say(self, s: Settings) -> str:
        """The setting as ``s`` has it."""
        return self.setting.format(block_swap=s.block_swap)


@dataclass(frozen=True)
class Room:
    """What the model allows: whether its blocks can be checkpointed, whether it has a frozen base to quantise."""

    checkpointable: bool
    frozen_base: bool
    encoders: bool
    plain_encoders: bool = False
    """Some text encoder is not quantised by its recipe."""
    swappable: int = 0
    """Blocks a block swap may take (a LoRA run's frozen base on a block-structured model; 0: none)."""


def _zero(stage: int) -> Callable[[Settings, Room], Optional[Settings]]:
    return lambda s, room: s.replace(zero_stage=stage) if s.world > 1 and s.zero_stage < stage else None


def _base(quant: str) -> Callable[[Settings, Room], Optional[Settings]]:
    def change(s: Settings, room: Room) -> Optional[Settings]:  # only a smaller base than the recipe's
        smaller = s.base_quant is None or QUANT_BYTES[quant] < QUANT_BYTES[s.base_quant]
        return s.replace(base_quant=quant) if room.frozen_base and smaller else None
    return change


def _swap(s: Settings, room: Room) -> Optional[Settings]:
    # Every block: fit() then takes the fewest that fit. Without checkpointing a swap saves nothing (autograd
    # keeps the device copies), and the engine refuses it under ZeRO-3.
    if s.block_swap or not room.swappable or not s.checkpointing or s.zero_stage == 3:
        return None
    return s.replace(block_swap=room.swappable)


LEVERS: tuple[Lever, ...] = (
    Lever("cached features", "data.cache: DIR (or shards from flowmatch-data encode)",
          lambda s, room: s.replace(cached=True) if room.encoders and not s.cached else None, kind=MANUAL),
    Lever("activation checkpointing", "train.activation_checkpointing: true",
          lambda s, room: s.replace(checkpointing=True) if room.checkpointable and not s.checkpointing else None,
          kind=APPLIED),
    Lever("ZeRO-2", "distributed.zero_stage: 2", _zero(2), kind=APPLIED),
    Lever("8-bit AdamW", "optim.name: adamw8bit",
          lambda s, room: s.replace(optimizer="adamw8bit") if s.optimizer == "adamw" else None, kind=MANUAL),
    Lever("int8 base", "model.quantize: int8", _base("int8"), kind=MANUAL),
    Lever("ZeRO-3", "distributed.zero_stage: 3", _zero(3), kind=APPLIED),
    Lever("nf4 base", "model.quantize: nf4", _base("nf4"), kind=MANUAL),
    Lever("int8 text encoders", "text_encoders.encoders.*.quantize: int8",
          lambda s, room: s.replace(encoder_quant="int8") if room.plain_encoders and not s.cached
          and s.encoder_quant is None else None, kind=MANUAL),
    Lever("block swap", "train.block_swap: {block_swap}", _swap, kind=MANUAL, slow=True),
    Lever("optimizer offload", "distributed.offload_optimizer: true",
          lambda s, room: s.replace(offload_optimizer=True, zero_stage=max(1, s.zero_stage))
          if not s.offload_optimizer else None, kind=APPLIED, slow=True),
    Lever("parameter offload", "distributed.offload_params: true (zero_stage 3)",
          lambda s, room: s.replace(offload_params=True, zero_stage=3) if not s.offload_params else None,
          kind=APPLIED, slow=True),
)


@dataclass(frozen=True)
class Fit:
    """Levers that make the recipe fit, and what it then peaks at."""

    levers: list[Lever]
    settings: Settings
    peak: int


def max_micro(cost: ModelCost, s: Settings, budget: int, *, cuda: bool, limit: int = MAX_MICRO) -> int:
    """The largest micro batch (at most ``limit``) whose peak fits ``budget`` under ``s``; 0 when none does."""
    lo, hi = 0, limit
    while lo < hi:  # the peak grows with the micro batch
        mid = (lo + hi + 1) // 2
        if peak(cost, s.replace(micro_batch=mid), cuda=cuda) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _apply(s: Settings, room: Room, levers: list[Lever]) -> tuple[Settings, list[Lever]]:
    """``s`` with ``levers`` applied in order, and those that applied."""
    used = []
    for lever in levers:
        changed = lever.change(s, room)
        if changed is not None:
            s, used = changed, [*used, lever]
    return s, used


def fit(cost: ModelCost, s: Settings, budget: int, room: Room, *, cuda: bool, applied_only: bool = False,
        fast_only: bool = False) -> Optional[Fit]:
    """Levers under which ``s`` (its micro batch) fits: the shortest run in :data:`LEVERS` order that fits, less
    any lever the others fit without; None when all of them together do not. ``applied_only``: only those
    ``flowmatch train`` applies; ``fast_only``: no offload."""
    candidates = [lv for lv in LEVERS if (lv.kind == APPLIED or not applied_only) and not (fast_only and lv.slow)]
    chosen: list[Lever] = []
    for lever in [None, *candidates]:
        if lever is not None:
            chosen.append(lever)
        current, used = _apply(s, room, chosen)
        if peak(cost, current, cuda=cuda) <= budget:
            break
    else:
        return None
    for lever in list(used):  # drop what is not needed, cheapest first
        without, rest = _apply(s, room, [lv for lv in used if lv is not lever])
        if peak(cost, without, cuda=cuda) <= budget:
            current, used = without, rest
    if current.block_swap != s.block_swap:  # the fewest blocks that fit: each one swapped costs host-link time
        current = next(c for n in range(1, current.block_swap + 1)
                       if peak(cost, c := current.replace(block_swap=n), cuda=cuda) <= budget)
    return Fit(used, current, peak(cost, current, cuda=cuda))


def all_levers(s: Settings, room: Room, *, applied_only: bool = False) -> tuple[Settings, list[Lever]]:
    """``s`` with every applicable lever applied, and those levers."""
    return _apply(s, room, [lv for lv in LEVERS if lv.kind == APPLIED or not applied_only])


def largest_lever(cost: ModelCost, s: Settings, room: Room, *, cuda: bool) -> Optional[tuple[Lever, int]]:
    """The one lever that lowers the peak of ``s`` most on its own, and the bytes it saves."""
    base = peak(cost, s, cuda=cuda)
    saved = [(lever, base - peak(cost, changed, cuda=cuda)) for lever in LEVERS
             if (changed := lever.change(s, room)) is not None]  # block swap: every block
    return max(saved, key=lambda pair: pair[1], default=None)
