"""A plan as text for people (``flowmatch plan``) and as JSON for tools (``--json``: at least ``peak_bytes``,
``fits`` and ``breakdown``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flowmatch.config import load_recipe
from flowmatch.plan import devices
from flowmatch.plan.devices import size
from flowmatch.plan.levers import MANUAL, Lever
from flowmatch.plan.memory import HOST_LINK_BYTES_PER_S, Settings, block_swap
from flowmatch.plan.planner import Plan, make_plan


def per_block(plan: Plan) -> list[int]:
    """What each block keeps without checkpointing at the recipe's micro batch."""
    one, two, m = plan.cost.act1.blocks, plan.cost.act2.blocks, plan.settings.micro_batch
    return [a + (b - a) * (m - 1) for a, b in zip(one, two)]


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """(first, last, value) of each run of equal neighbours."""
    runs: list[tuple[int, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i, v)
        else:
            runs.append((i, i, v))
    return runs


def _lever(lever: Lever, plan: Plan, s: Settings) -> str:
    """The lever as ``s`` sets it; a block swap with its host memory and host-link time."""
    why = "; set it yourself" if lever.kind == MANUAL else ""
    cost = _swap_cost(plan, s) if "block_swap" in lever.setting else ""
    return f"{lever.name} ({lever.say(s)}{why}{cost})"


def _swap_cost(plan: Plan, s: Settings) -> str:
    swap = block_swap(plan.cost, s)
    return (f"; {size(swap.host)} of pinned host memory, {swap.crossings} x {size(swap.host)} over the host link "
            f"per micro batch, about {swap.seconds:.2f} s at {HOST_LINK_BYTES_PER_S / 1e9:g} GB/s (PCIe 4 x16, an "
            "estimate)")


def format_plan(plan: Plan, title: str) -> str:
    """The plan as lines of text."""
    s, p, seq, dev = plan.settings, plan.cost.params, plan.sequence, plan.device
    out = [f"{title} on {dev.name} ({dev.memory_gib:g} GiB; source: {dev.source}), {s.world} process"
           f"{'es' if s.world > 1 else ''}",
           f"model: {(p.trainable + p.frozen) / 1e6:.1f}M parameters ({p.trainable / 1e6:.1f}M trained); per sample "
           f"{seq.image_tokens} image + "
           + (f"{seq.reference_tokens} reference ({seq.references} image) + " if seq.references else "")
           + f"{seq.text_tokens} text tokens, input {'x'.join(map(str, seq.latent))}",
           *([plan.architecture] if plan.architecture else []),
           *(f"what-if: {line}" for line in plan.what_if.values()),
           *([f"frozen base: model.quantize: {s.base_quant}"] if s.base_quant and "base_quant" not in plan.what_if
             else []),
           *([f"block swap (train.block_swap: {s.block_swap}{_swap_cost(plan, s)})"] if s.block_swap else []),
           f"peak per rank at micro batch {s.micro_batch}: {size(plan.peak)} of {size(plan.budget)}: "
           + ("fits" if plan.fits else f"does NOT fit, over by {size(plan.peak - plan.budget)}")]
    width = max(len(line.name) for line in plan.lines)
    out += [f"  {line.name:<{width}} {size(line.bytes):>12}  {line.note}" for line in plan.lines]
    a1 = plan.cost.activations(1, False), plan.cost.activations(1, True)
    out.append(f"activations per sample: {size(a1[0])} without checkpointing, {size(a1[1])} with it")
    blocks = per_block(plan)
    if blocks:
        runs = ", ".join(f"block{'s' if a != b else ''} {a}{'-' + str(b) if a != b else ''}: {size(v)}"
                         for a, b, v in _runs(blocks))
        out.append(f"  per block at micro batch {s.micro_batch} (kept without checkpointing): {runs}")
    out.append(f"largest micro batch that fits as the recipe is: {plan.max_micro or 'none (not even 1)'}")
    if plan.fit is not None and plan.fit.levers:
        out.append(f"to fit micro batch {s.micro_batch}: "
                   + "; ".join(_lever(lv, plan, plan.fit.settings) for lv in plan.fit.levers)
                   + f" -> peak {size(plan.fit.peak)}")
    elif plan.fit is None and plan.fit_micro:
        out.append(f"micro batch {s.micro_batch} does not fit with every lever; the largest that does: "
                   f"{plan.fit_micro} (raise the gradient accumulation: train.micro_batch_size)")
    elif plan.fit is None:
        out.append(f"cannot fit, not even micro batch 1 with every lever: over by {size(plan.shortfall)}")
    if not plan.fits and plan.largest is not None:
        lever, saved = plan.largest
        out.append(f"largest single lever: {_lever(lever, plan, lever.change(s, plan.room))}, saves {size(saved)}")
    return "\n".join(out)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict."""
    def lever(lv: Lever, s: Settings) -> dict[str, Any]:
        return {"name": lv.name, "setting": lv.say(s), "kind": lv.kind}

    swap = block_swap(plan.cost, plan.settings)

    return {
        "device": {"name": plan.device.name, "memory_bytes": plan.budget, "source": plan.device.source},
        "settings": dataclasses.asdict(plan.settings),
        "peak_bytes": plan.peak,
        "fits": plan.fits,
        "breakdown": {line.name: line.bytes for line in plan.lines},
        "what_if": plan.what_if,
        "block_swap": {"blocks": plan.settings.block_swap, "host_bytes": swap.host, "device_bytes": swap.in_flight,
                       "host_link_bytes_per_micro_batch": swap.host * swap.crossings,
                       "host_link_seconds_per_micro_batch": swap.seconds},
        "notes": {line.name: line.note for line in plan.lines},
        "parameters": dataclasses.asdict(plan.cost.params),
        "tokens": {"image": plan.sequence.image_tokens, "reference": plan.sequence.reference_tokens,
                   "text": plan.sequence.text_tokens},
        "activations_per_block": per_block(plan),
        "activations_per_sample": {"plain": plan.cost.activations(1, False),
                                   "checkpointed": plan.cost.activations(1, True)},
        "max_micro_batch": plan.max_micro,
        "fit": None if plan.fit is None else {"levers": [lever(lv, plan.fit.settings) for lv in plan.fit.levers],
                                              "peak_bytes": plan.fit.peak},
        "max_micro_batch_with_every_lever": plan.fit_micro,
        "shortfall_bytes": plan.shortfall,
        "largest_lever": None if plan.largest is None else {
            **lever(plan.largest[0], plan.largest[0].change(plan.settings, plan.room)), "saves_bytes": plan.largest[1]},
    }


def plan_command(path: str | None, overrides: list[str], *, device: str, memory_gb: float | None, gpus: int,
                 quantize: str | None, optimizer: str | None, as_json: bool) -> str:
    """What ``flowmatch plan`` prints: the plan of the recipe at ``path`` (with ``overrides``) on ``device`` (or
    ``memory_gb`` of memory), as text or JSON."""
    target = devices.budget_device(memory_gb) if memory_gb is not None else devices.get_device(device)
    plan = make_plan(load_recipe(path, overrides), target, gpus, assume={"base_quant": quantize,
                                                                         "optimizer": optimizer})
    return json.dumps(plan_json(plan), indent=1) if as_json else format_plan(plan, path or "recipe")
