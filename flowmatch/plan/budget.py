"""``distributed.memory_budget_gb``: the settings ``flowmatch train`` changes so that a recipe fits the budget.

Only what flowmatch can set by itself is applied (activation checkpointing, the ZeRO stage, offload, and the
micro batch, whose gradient accumulation keeps the global batch): the largest micro batch that divides the
per-process batch and fits, with the fewest levers, trying every lever but offload first. A budget nothing fits
is a RecipeError that says by how much and which lever (applied or a suggestion) would help most.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flowmatch.config import Recipe
from flowmatch.errors import RecipeError
from flowmatch.plan.devices import budget_device, size
from flowmatch.plan.levers import Fit, all_levers, fit, largest_lever
from flowmatch.plan.memory import peak
from flowmatch.plan.planner import make_plan


@dataclass(frozen=True)
class Budgeted:
    """The recipe as it will train, and what the planner changed."""

    recipe: Recipe
    fit: Fit
    message: str


def _divisors_down(n: int, most: int) -> list[int]:
    return [d for d in range(min(n, most), 0, -1) if n % d == 0]


def apply_budget(recipe: Recipe, world: int, *, cuda: bool) -> Budgeted:
    """``recipe`` changed to fit ``distributed.memory_budget_gb`` on ``world`` processes (``cuda``: the budget is
    a CUDA device's, with its context and allocator headroom)."""
    budget_gb = recipe.distributed.memory_budget_gb
    plan = make_plan(recipe, budget_device(budget_gb, cuda=cuda), world)
    per_rank = max(1, recipe.train.batch_size // world)
    found = None
    for fast_only in (True, False):
        for micro in _divisors_down(per_rank, plan.settings.micro_batch):
            settings = plan.settings.replace(micro_batch=micro, accumulating=micro * world < recipe.train.batch_size)
            found = fit(plan.cost, settings, plan.budget, plan.room,
                        cuda=cuda, applied_only=True, fast_only=fast_only)
            if found is not None:
                break
        if found is not None:
            break
    if found is None:
        best, _ = all_levers(plan.settings.replace(micro_batch=1), plan.room, applied_only=True)
        over = peak(plan.cost, best, cuda=cuda) - plan.budget
        rest = largest_lever(plan.cost, best, plan.room, cuda=cuda)  # among what train cannot set itself
        lever = "" if rest is None else (f"; the largest lever left is {rest[0].name} "
                                         f"({rest[0].say(rest[0].change(best, plan.room))}, saves {size(rest[1])})")
        raise RecipeError(f"distributed.memory_budget_gb: {budget_gb:g}: the recipe does not fit, not even micro "
                          f"batch 1 with activation checkpointing, ZeRO and offload: over by {size(over)}{lever}; "
                          "run flowmatch plan for the breakdown")
    s = found.settings
    t = dataclasses.replace(recipe.train, activation_checkpointing=s.checkpointing,
                            micro_batch_size=s.micro_batch if s.micro_batch != plan.settings.micro_batch
                            else recipe.train.micro_batch_size)
    d = dataclasses.replace(recipe.distributed, zero_stage=s.zero_stage, offload_optimizer=s.offload_optimizer,
                            offload_params=s.offload_params)
    changes = [lv.say(s) for lv in found.levers]
    if s.micro_batch != plan.settings.micro_batch:
        changes.append(f"train.micro_batch_size: {s.micro_batch}")
    message = (f"memory budget {budget_gb:g} GiB per process: planned peak {size(found.peak)} "
               + (f"after {', '.join(changes)}" if changes else "with the recipe as it is"))
    return Budgeted(dataclasses.replace(recipe, train=t, distributed=d), found, message)
