"""The planner's optimizer state (read from the recipe's optimizer) and a few-step objective's targets (traced live
on meta): known answers against the real optimizers and a real CPU run, and their terms in the peak."""

from pathlib import Path

import pytest
import torch
from torch import nn

from flowmatch.config import load_recipe
from flowmatch.families import build_backbone
from flowmatch.flow import ObjectiveModels, get_objective
from flowmatch.flow.jvp import fp32_call
from flowmatch.plan import frozen
from flowmatch.plan.devices import get_device
from flowmatch.plan.live import live_peak
from flowmatch.plan.memory import ModelCost, Settings, breakdown
from flowmatch.plan.planner import make_plan, recipe_settings
from flowmatch.plan.shape import _conditioning, model_cost
from flowmatch.plan.trace import Activations, ParamCount, optimizer_state_bytes

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [torch.Size(s) for s in ((96, 64), (64,), (2, 8, 40), (3, 5))]


def real_state_bytes(opt: torch.optim.Optimizer) -> int:
    seen = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for state in opt.state.values() for v in state.values() if torch.is_tensor(v)}
    return sum(seen.values())


def stepped(cls, **kw) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, lr=1e-3, **kw)
    opt.step()
    return opt


def test_adafactor_and_adamw_state_are_the_real_optimizers():
    """Known answer: each optimizer's state after a real CPU step on the same shapes; Adafactor keeps a row and a
    column per matrix (a full second moment for a vector), far below AdamW's two moments."""
    ada, adamw = optimizer_state_bytes("adafactor", SHAPES), optimizer_state_bytes("adamw", SHAPES)
    assert ada == real_state_bytes(stepped(torch.optim.Adafactor))
    assert ada == 4 * (96 + 64 + 64 + 2 * 8 + 2 * 40 + 3 + 5) + 4 * len(SHAPES)  # moments + one step scalar each
    assert adamw == real_state_bytes(stepped(torch.optim.AdamW)) == 8 * sum(s.numel() for s in SHAPES) + 4 * 4


def test_adamw8bit_layout_is_bitsandbytes_state():
    bnb = pytest.importorskip("bitsandbytes")
    big = [torch.Size((128, 64)), torch.Size((100,)), torch.Size((70, 70))]  # 8-bit, fp32 (small), 8-bit
    params = [nn.Parameter(torch.randn(s)) for s in big]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    opt.step()
    assert optimizer_state_bytes("adamw8bit", big) == real_state_bytes(opt)


def test_the_recipes_optimizer_is_priced():
    """optim.name reaches the plan: Adafactor's state is its own, not AdamW's (the one-line bug: the settings
    keep the default optimizer)."""
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", ["model.preset=tiny", "train.batch_size=4",
                                                              "optim.name=adafactor"])
    plan = make_plan(recipe, get_device("h100"))
    lines = {line.name: line.bytes for line in plan.lines}
    assert plan.settings.optimizer == "adafactor" == recipe_settings(recipe, 1).optimizer
    assert lines["optimizer state"] == plan.cost.optimizer_state["adafactor"] < plan.cost.optimizer_state["adamw"] / 10


def test_live_peak_known_answer():
    """A chain of linears without gradients holds two outputs at once (the input and weights are not new)."""
    layers = [nn.Linear(100, 100, device="meta") for _ in range(4)]

    def forward(x):
        for layer in layers:
            x = layer(x)
        return x

    with torch.device("meta"):
        x = torch.zeros(10, 100)
    with torch.no_grad():
        assert live_peak(lambda: forward(x)) == 2 * 10 * 100 * 4
        # forward mode carries a tangent beside every output
        assert live_peak(lambda: torch.func.jvp(forward, (x,), (torch.ones_like(x),))) >= 4 * 10 * 100 * 4


def meanflow(*extra):
    return load_recipe(ROOT / "recipes" / "digits.yaml", [
        "model.preset=tiny", "train.batch_size=4", "model.interval_embed=true", "flow.objective=meanflow",
        "flow.meanflow.interval_fraction=0.5", "train.ema_decay=0", "train.ema_profiles=[]", *extra])


def test_meanflow_targets_are_traced_as_a_cpu_run_holds_them():
    """The exact JVP's live bytes on meta follow the same objective's on the CPU, and scale with the interval
    rows of a micro batch (round(0.5 B))."""
    cost, seq, recipe = model_cost(meanflow())
    assert cost.targets[1] > cost.targets[0] > 0
    assert [cost.interval_rows(b) for b in (1, 3, 4)] == [0, 2, 2] and cost.target_bytes(1) == 0
    assert cost.target_bytes(4) == cost.targets[1]
    torch.manual_seed(0)
    model = build_backbone(recipe.model)
    channels, side, _ = seq.latent
    objective, flow = get_objective("meanflow"), recipe.flow
    models = ObjectiveModels(student=model, tangent=lambda *a, **k: fp32_call(model, *a, **k))
    x, v = torch.randn(2, channels, side, side), torch.randn(2, channels, side, side)
    t, r = torch.full((2,), 0.75), torch.full((2,), 0.25)
    cond = _cpu_conditioning(recipe, 2)
    real = live_peak(lambda: objective.target(models, cond, x, t, r, v, flow=flow, jvp_backend="exact"))
    # The CPU's math attention holds one more score-sized tensor at its peak (a copy the meta path does not make).
    assert 0.8 * real <= cost.targets[1] <= real


def _cpu_conditioning(recipe, batch):
    shapes = {name: frozen.text_encoder(name, cfg, name)[1] for name, cfg in recipe.text.encoders.items()}
    return _conditioning(recipe, shapes, batch)


def test_targets_count_where_they_exceed_the_trained_step():
    """Known answers: the targets are made before the trained forward, so the peak grows only by what they hold
    beyond max(activations, gradients) (no accumulation) or beyond the activations (accumulating)."""
    act = Activations(blocks=[500], in_blocks=500, block_inputs=0, outside=500)  # 1000 bytes at any micro batch
    c = ModelCost(ParamCount(100, 0, 10), 0, act, act, [], targets=(3000, 5000), interval_rows=lambda b: b // 2)
    s = Settings(micro_batch=4, checkpointing=False, zero_stage=0, precision="fp32", world=1)
    terms = {line.name: line.bytes for line in breakdown(c, s, cuda=False)}
    assert terms["objective targets"] == 5000 - max(1000, 400)
    terms = {line.name: line.bytes for line in breakdown(c, s.replace(accumulating=True), cuda=False)}
    assert terms["objective targets"] == 5000 - 1000
    terms = {line.name: line.bytes for line in breakdown(c, s.replace(micro_batch=1), cuda=False)}
    assert "objective targets" not in terms  # no interval rows


def test_caption_dropout_keeps_the_batchs_conditioning_beside_its_copy():
    """Known answer: with caption dropout the model takes (and saves) a copy of the batch's text features, so the
    batch's own stay beside it: hidden (L, D) fp32, mask (L,) bool and pooled (P,) fp32 per sample; none without."""
    tiny = ["model.preset=tiny", "train.batch_size=4"]
    cost, seq, recipe = model_cost(load_recipe(ROOT / "recipes" / "digits.yaml", tiny))
    assert recipe.flow.caption_dropout > 0
    per_sample = seq.text_tokens * (recipe.model.context_dim * 4 + 1) + recipe.model.pooled_dim * 4
    assert cost.conditioning == (per_sample, 2 * per_sample)
    s = Settings(micro_batch=3, checkpointing=False, zero_stage=0, precision="fp32", world=1)
    assert {line.name: line.bytes for line in breakdown(cost, s, cuda=False)}["batch conditioning"] == 3 * per_sample
    cost, _, _ = model_cost(load_recipe(ROOT / "recipes" / "digits.yaml", [*tiny, "flow.caption_dropout=0"]))
    assert cost.conditioning == (0, 0)
    assert "batch conditioning" not in {line.name for line in breakdown(cost, s, cuda=False)}


def test_the_exact_jvp_is_not_offered_activation_checkpointing():
    """The trainer refuses the exact JVP with activation checkpointing, so the plan does not propose it."""
    cost = model_cost(meanflow())[:2]
    assert not make_plan(meanflow(), get_device("h100"), cost=cost).room.checkpointable
    assert make_plan(meanflow("flow.meanflow.jvp=finite_difference"), get_device("h100"), cost=cost).room.checkpointable
