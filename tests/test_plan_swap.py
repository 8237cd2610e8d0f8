"""The planner reads a recipe's quantised base (model.quantize, text_encoders.encoders.*.quantize) and its block swap
(train.block_swap) as the trainer applies them, and offers block swap at the fewest blocks that fit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flowmatch.config import load_recipe
from flowmatch.families import build_backbone
from flowmatch.families.lora import apply_lora
from flowmatch.models.offload import apply_block_swap
from flowmatch.plan import frozen
from flowmatch.plan.devices import get_device, size
from flowmatch.plan.levers import LEVERS, Room, fit
from flowmatch.plan.memory import QUANT_BYTES, ModelCost, Settings, breakdown, dtype_bytes, peak
from flowmatch.plan.planner import make_plan
from flowmatch.plan.report import format_plan, plan_json
from flowmatch.plan.shape import model_cost
from flowmatch.plan.trace import Activations, ParamCount
from tests.test_export import digits_inputs

ROOT = Path(__file__).resolve().parents[1]
H100 = get_device("h100")


def lora_recipe(*overrides):
    """The digits recipe as a checkpointed LoRA run (planned only: init_from is never read)."""
    return load_recipe(ROOT / "recipes" / "digits.yaml", [
        "train.batch_size=16", "model.lora={rank: 4, alpha: 4}", "model.init_from=runs/never-read",
        "train.activation_checkpointing=true", *overrides])


@pytest.fixture(scope="module")
def counted():
    """One meta-device count of the LoRA digits model (its filled-in recipe too) for every test here."""
    cost, seq, recipe = model_cost(lora_recipe())
    return cost, seq, recipe


def lines(plan):
    return {line.name: line.bytes for line in plan.lines}


def test_the_recipes_quantised_base_plans_as_the_flag(counted):
    # Fails if recipe_settings drops model.quantize (the recipe plans its bf16 base), if the report does not say
    # where the quantisation came from, or if an encoder's own quantize is not priced.
    cost, seq, recipe = counted
    quantised = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantize="nf4"))
    written = make_plan(quantised, H100, cost=(cost, seq))
    flag = make_plan(recipe, H100, cost=(cost, seq), assume={"base_quant": "nf4"})
    plain = make_plan(recipe, H100, cost=(cost, seq))
    assert written.lines == flag.lines and written.settings == flag.settings
    w = dtype_bytes(recipe.distributed.precision)
    assert lines(plain)["weights"] - lines(written)["weights"] == int(cost.quantisable * (w - QUANT_BYTES["nf4"]))
    assert written.what_if == {} and "frozen base: model.quantize: nf4" in format_plan(written, "r")
    assert flag.what_if == {"base_quant": "--quantize nf4 in place of the recipe's model.quantize: none"}
    assert "what-if: --quantize nf4" in format_plan(flag, "r")
    # An encoder quantised by its recipe is priced so, and not offered int8 again.
    name, cfg = next(iter(recipe.text.encoders.items()))
    part, _ = frozen.text_encoder(name, dataclasses.replace(cfg, quantize="int8"), "key")
    assert part.quant == "int8"
    s = written.settings.replace(cached=False)
    enc = {line.name: line.bytes for line in breakdown(dataclasses.replace(cost, encoders=[part]), s, cuda=False)}
    assert enc["frozen encoders"] == part.params  # one byte each


def test_block_swap_moves_the_last_blocks_frozen_weights_to_the_host(counted):
    # Fails if the plan swaps the first blocks instead of the last, counts the adapters (which stay on the device)
    # as swapped, keeps fewer or more than two blocks in flight, or leaves the swapped bytes in the weights.
    cost, seq, recipe = counted
    swapped = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, block_swap=2))
    plan, plain = make_plan(swapped, H100, cost=(cost, seq)), make_plan(recipe, H100, cost=(cost, seq))
    # What the engine's swap really takes to the host: the frozen tensors of the last two blocks.
    torch.manual_seed(0)
    model = build_backbone(recipe.model)
    apply_lora(model, recipe.model.lora)
    swap = apply_block_swap(model.blocks(), 2, "cpu")
    moved = [t.numel() for r in swap._resident for (_, _, is_param), t in zip(r.slots, r.cpu) if is_param]
    w = dtype_bytes(recipe.distributed.precision)
    host = sum(moved) * w
    report = json.loads(json.dumps(plan_json(plan)))
    assert report["block_swap"]["host_bytes"] == host > 0
    assert lines(plain)["weights"] - lines(plan)["weights"] == host
    each = [sum(t.numel() for t in r.cpu) * w for r in swap._resident]
    assert lines(plan)["swapped blocks on device"] == sum(each)  # two swapped: both in flight
    assert report["block_swap"]["host_link_bytes_per_micro_batch"] == 2 * host  # forward and recomputation
    assert f"{size(host)} of pinned host memory" in format_plan(plan, "r")
    with pytest.raises(ValueError, match="without ZeRO-3"):  # the trainer refuses it too
        make_plan(dataclasses.replace(swapped, distributed=dataclasses.replace(recipe.distributed, zero_stage=3)),
                  H100, cost=(cost, seq))
    with pytest.raises(ValueError, match="train.block_swap: 9 is more than the model's 4 blocks"):
        make_plan(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, block_swap=9)), H100,
                  cost=(cost, seq))


def hand_cost(blocks: tuple[int, ...], quantisable: tuple[int, ...], outside: int = 0) -> ModelCost:
    """A hand-made LoRA model: 10 trained parameters, frozen blocks of the given sizes, and ``outside`` frozen
    linear weights outside them."""
    acts = Activations([0] * len(blocks), 0, 0, 0)
    return ModelCost(ParamCount(10, sum(blocks) + outside, max(blocks)), sum(quantisable) + outside, acts, acts, [],
                     block_frozen=blocks, block_quantisable=quantisable)


def test_block_swap_known_answers():
    # Fails if a swap keeps one block (or all of them) in flight under checkpointing, or saves anything without
    # it (autograd keeps every device copy until its backward).
    c = hand_cost((100, 100, 200, 300), (0, 0, 0, 0))
    s = Settings(micro_batch=1, checkpointing=True, zero_stage=0, precision="bf16", world=1)
    t0, t3 = (dict((ln.name, ln.bytes) for ln in breakdown(c, s.replace(block_swap=n), cuda=False)) for n in (0, 3))
    assert t0["weights"] - t3["weights"] == (100 + 200 + 300) * 2
    assert t3["swapped blocks on device"] == (300 + 200) * 2  # the two largest swapped blocks
    plain = s.replace(checkpointing=False)
    assert peak(c, plain.replace(block_swap=3), cuda=False) == peak(c, plain, cuda=False)


def test_a_quantised_base_keeps_its_dequantised_weights_for_the_backward(counted):
    # benchmarks/memory.py's lora-nf4 case measured 0.60 x its plan without this term. Fails if the term is left
    # out, counts every block under checkpointing (only the one recomputed keeps them) or one block without it, or
    # if the trace counts a frozen linear whose input needs no gradient (the modulation's, fed the conditioning
    # vector, and the first block's qkv, fed the embedded inputs: autograd keeps nothing of them).
    # Of each block's frozen linear weights (64, 64, 128, 256; 32 outside), autograd keeps these:
    acts = Activations([0] * 4, 0, 0, 0, frozen_linears=(32, 64, 128, 200), frozen_linears_outside=16)
    c = dataclasses.replace(hand_cost((100, 100, 200, 300), (64, 64, 128, 256), outside=32), act1=acts, act2=acts)
    s = Settings(micro_batch=1, checkpointing=True, zero_stage=0, precision="bf16", world=1, base_quant="nf4")
    t = {ln.name: ln.bytes for ln in breakdown(c, s, cuda=False)}
    assert t["dequantised weights"] == (16 + 200) * 2
    t = {ln.name: ln.bytes for ln in breakdown(c, s.replace(checkpointing=False), cuda=False)}
    assert t["dequantised weights"] == (16 + 32 + 64 + 128 + 200) * 2
    assert "dequantised weights" not in {ln.name for ln in breakdown(c, s.replace(base_quant=None), cuda=False)}
    # The trace against a CPU forward of the same model: the frozen linear weights autograd really keeps.
    cost, _, recipe = counted
    torch.manual_seed(0)
    model = build_backbone(recipe.model)
    apply_lora(model, recipe.model.lora)
    frozen_weights = {m.weight.data_ptr(): m.weight.numel() for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad}
    kept = {}

    def pack(t):
        if t.data_ptr() in frozen_weights:
            kept[t.data_ptr()] = frozen_weights[t.data_ptr()]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*digits_inputs(model))
    assert 0 < sum(kept.values()) < sum(frozen_weights.values())  # the modulation's and the first qkv's are not
    assert sum(cost.act1.frozen_linears) + cost.act1.frozen_linears_outside == sum(kept.values())


def test_block_swap_is_offered_at_the_fewest_blocks_that_fit():
    # Four nf4 blocks of 3600 bytes: swapping N saves N blocks less the two in flight (0, 0, 3600, 7200). Fails if
    # fit() keeps every block swapped, or if a lever the recipe already sets (or a larger base) is offered again.
    c = hand_cost((6400,) * 4, (6400,) * 4)
    assert int(6400 * QUANT_BYTES["nf4"]) == 3600
    s = Settings(micro_batch=1, checkpointing=True, zero_stage=0, precision="bf16", world=1, base_quant="nf4",
                 optimizer="adamw8bit")
    room = Room(checkpointable=True, frozen_base=True, encoders=False, swappable=4)
    whole = peak(c, s, cuda=False)
    for short, blocks in ((1000, 3), (5000, 4)):
        found = fit(c, s, whole - short, room, cuda=False)
        assert [lv.name for lv in found.levers] == ["block swap"] and found.settings.block_swap == blocks
        assert found.levers[0].say(found.settings) == f"train.block_swap: {blocks}"
    by_name = {lv.name: lv for lv in LEVERS}
    assert by_name["block swap"].change(s.replace(block_swap=1), room) is None
    assert by_name["int8 base"].change(s, room) is None and by_name["nf4 base"].change(s, room) is None
    assert by_name["nf4 base"].change(s.replace(base_quant="int8"), room).base_quant == "nf4"
