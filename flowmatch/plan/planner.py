"""A recipe's plan on a device: the peak of one rank term by term, the largest micro batch that fits, the levers
that make it fit, and when nothing does, by how much and which lever matters most.

    plan = make_plan(recipe, get_device("rtx4090"), world=1)
    plan.fits, plan.peak, plan.lines, plan.fit.levers, plan.largest
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from flowmatch.config import Recipe
from flowmatch.families import family_of
from flowmatch.flow import get_objective
from flowmatch.plan.devices import Device
from flowmatch.plan.frozen import AUTOENCODER
from flowmatch.plan.levers import Fit, Lever, Room, all_levers, fit, largest_lever, max_micro
from flowmatch.plan.memory import Line, ModelCost, Settings, breakdown
from flowmatch.plan.shape import SampleShape, model_cost

#: The settings ``flowmatch plan`` can plan in place of the recipe's: their command-line flag and recipe key.
WHAT_IF = {"base_quant": ("--quantize", "model.quantize"), "optimizer": ("--optimizer", "optim.name")}


def recipe_settings(recipe: Recipe, world: int) -> Settings:
    """The settings a recipe trains with on ``world`` processes."""
    t, d = recipe.train, recipe.distributed
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    return Settings(
        micro_batch=micro, checkpointing=t.activation_checkpointing, accumulating=t.batch_size > micro * world,
        zero_stage=d.zero_stage, precision=d.precision, world=world, offload_optimizer=d.offload_optimizer,
        offload_params=d.offload_params, cached=recipe.data.cached is True or bool(recipe.data.cache),
        optimizer=recipe.optim.name, base_quant=recipe.model.quantize, block_swap=t.block_swap,
        ema_copies=(1 + len(t.ema_profiles)) if t.ema_decay > 0 else 0)


@dataclass
class Plan:
    """What :func:`make_plan` found."""

    device: Device
    settings: Settings
    """The recipe's settings."""
    lines: list[Line]
    cost: ModelCost
    sequence: SampleShape
    room: Room
    max_micro: int
    """The largest micro batch that fits under the recipe's other settings (0: none)."""
    fit: Optional[Fit]
    """The levers that fit the recipe's micro batch (no levers when it fits as it is); None: nothing does."""
    fit_micro: int
    """The largest micro batch that fits with every lever (0: none)."""
    largest: Optional[tuple[Lever, int]]
    """The lever that lowers the recipe's peak most on its own, and the bytes it saves."""
    architecture: str = ""
    """Where the planned architecture comes from, when the recipe starts from weights."""
    what_if: dict[str, str] = field(default_factory=dict)
    """Settings field -> what the command line planned in place of the recipe's (``--quantize``, ``--optimizer``)."""

    @property
    def peak(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def budget(self) -> int:
        return self.device.memory_bytes

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def shortfall(self) -> int:
        """Bytes over the budget with every lever at micro batch 1 (0 when something fits)."""
        if self.fit_micro:
            return 0
        best, _ = all_levers(self.settings.replace(micro_batch=1), self.room)
        return sum(line.bytes for line in breakdown(self.cost, best, cuda=self.device.cuda)) - self.budget


def make_plan(recipe: Recipe, device: Device, world: int = 1,
              cost: Optional[tuple[ModelCost, SampleShape]] = None, assume: Optional[dict[str, Any]] = None) -> Plan:
    """Plan ``recipe`` on ``world`` processes of ``device`` (``cost``: the model's count when already made;
    ``assume``: :class:`Settings` fields planned in place of the recipe's, a what-if such as ``base_quant``)."""
    if world < 1:
        raise ValueError(f"the number of GPUs must be at least 1, got {world}")
    if cost is None:
        counted, seq, recipe = model_cost(recipe)
    else:
        counted, seq = cost
    written = recipe_settings(recipe, world)
    s = written.replace(**{k: v for k, v in (assume or {}).items() if v is not None})
    if s.base_quant and not counted.params.frozen:
        raise ValueError(f"--quantize {s.base_quant} quantises a LoRA run's frozen base, but this recipe trains "
                         "every weight: set model.lora (and model.init_from) or leave --quantize out")
    blocks = len(counted.block_frozen)
    if s.block_swap > blocks:
        raise ValueError(f"train.block_swap: {s.block_swap} is more than the model's {blocks} blocks")
    what_if = {k: f"{flag} {getattr(s, k)} in place of the recipe's {key}: {getattr(written, k) or 'none'}"
               for k, (flag, key) in WHAT_IF.items() if getattr(s, k) != getattr(written, k)}
    # The exact JVP runs without activation checkpointing (flowmatch.training.fewstep refuses the two together).
    exact_jvp = (get_objective(recipe.flow.objective).uses_jvp and not recipe.flow.teacher_steps
                 and recipe.flow.meanflow.backend(recipe.distributed.zero_stage) == "exact")
    checkpointable = family_of(recipe.model).capabilities.block_transforms
    text = [part for part in counted.encoders if part.name != AUTOENCODER]
    room = Room(checkpointable=checkpointable and not exact_jvp, frozen_base=counted.params.frozen > 0,
                encoders=bool(counted.encoders), plain_encoders=any(part.quant is None for part in text),
                # flowmatch.training.assembly.swap_blocks: the frozen base of a LoRA run on a block-structured model
                swappable=blocks if recipe.model.lora is not None and checkpointable else 0)
    if s.block_swap and (not room.swappable or s.zero_stage == 3):  # as the trainer refuses it
        raise ValueError(f"train.block_swap: {s.block_swap} streams the frozen base of a LoRA run (model.lora) "
                         "without ZeRO-3 on a block-structured model; set train.block_swap: 0")
    cuda, budget = device.cuda, device.memory_bytes
    everything, _ = all_levers(s, room)
    return Plan(device=device, settings=s, lines=breakdown(counted, s, cuda=cuda), cost=counted, sequence=seq,
                room=room, max_micro=max_micro(counted, s, budget, cuda=cuda),
                fit=fit(counted, s, budget, room, cuda=cuda),
                fit_micro=max_micro(counted, everything, budget, cuda=cuda),
                largest=largest_lever(counted, s, room, cuda=cuda), architecture=_architecture(recipe),
                what_if=what_if)


def _architecture(recipe: Recipe) -> str:
    # Reading the architecture of init_from's weights may mean hashing gigabytes (flowmatch.init_from.locate):
    # the plan takes the recipe's model section, as training checks it against the weights.
    if not recipe.model.init_from:
        return ""
    return (f"architecture: model.preset {recipe.model.preset} and the recipe's model keys (model.init_from's "
            "weights are not read: give their preset if they differ)")
