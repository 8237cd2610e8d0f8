"""The memory planner: its counts against the real model, its terms against hand-computed known answers, its
levers, `flowmatch plan`, and `distributed.memory_budget_gb` reaching the trainer."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import tiny_recipe

from flowmatch.cli import main
from flowmatch.conditioning import Conditioning
from flowmatch.config import load_recipe
from flowmatch.encoders.autoencoder import AutoencoderConfig
from flowmatch.encoders.text import TextEncoderConfig
from flowmatch.errors import RecipeError
from flowmatch.families import build_backbone
from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import config_from_preset
from flowmatch.models.lora import LoraConfig
from flowmatch.plan import frozen
from flowmatch.plan.budget import apply_budget
from flowmatch.plan.devices import GIB, budget_device, get_device
from flowmatch.plan.levers import LEVERS, Room, fit, largest_lever, max_micro
from flowmatch.plan.memory import ModelCost, Settings, breakdown, peak
from flowmatch.plan.planner import make_plan
from flowmatch.plan.shape import model_cost
from flowmatch.plan.trace import Activations, ParamCount, count_params, trace_activations
from flowmatch.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
B, C, SIDE, L = 2, 4, 8, 6  # batch, latent channels, latent side, text tokens


def tiny(device=None, **kw):
    cfg = config_from_preset("tiny", in_channels=C, context_dim=32, pooled_dim=16, **kw)
    if device == "meta":
        with torch.device("meta"):
            return cfg, build_backbone(cfg)
    torch.manual_seed(0)
    return cfg, build_backbone(cfg)


def inputs(cfg, dtype=torch.float32):
    return (torch.randn(B, C, SIDE, SIDE, dtype=dtype), torch.rand(B),
            Conditioning(torch.randn(B, L, cfg.context_dim, dtype=dtype), torch.ones(B, L, dtype=torch.bool),
                         torch.randn(B, cfg.pooled_dim, dtype=dtype)))


def loss(v):
    return v.float().square().mean()


def real_saved_bytes(model, args) -> int:
    """What autograd really keeps in a CPU forward: every saved storage once, the parameters' excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(model(*args))
    return sum(seen.values())


@pytest.mark.parametrize("lora", [False, True])
def test_meta_trace_keeps_exactly_what_a_cpu_forward_keeps(lora):
    """The meta-device trace (fused attention, parameters excluded, views once) equals the bytes a real CPU forward
    saves, with and without a frozen LoRA base (a frozen linear keeps no input)."""
    cfg, model = tiny()
    cfg_m, meta = tiny("meta")
    if lora:
        for m in (model, meta):
            torch.manual_seed(0)
            apply_lora(m, LoraConfig(rank=4, alpha=4))
    with torch.device("meta"):
        meta_args = inputs(cfg_m)
    traced = trace_activations(meta, list(meta.blocks()), meta_args, loss)
    assert traced.plain == real_saved_bytes(model, inputs(cfg))
    assert len(traced.blocks) == cfg.depth and traced.outside > 0


def test_checkpointing_keeps_each_blocks_inputs_once():
    """Known answer: a joint block takes the image and text tokens (B, N + L, D), and the time vector (B, D) and
    the mask (B, 1, 1, N + L) that every block shares, counted once."""
    cfg, meta = tiny("meta")
    with torch.device("meta"):
        args = inputs(cfg)
    traced = trace_activations(meta, list(meta.blocks()), args, loss)
    n, d = (SIDE // cfg.patch_size) ** 2, cfg.num_heads * cfg.head_dim
    assert traced.block_inputs == cfg.depth * B * (n + L) * d * 4 + B * d * 4 + B * (n + L)
    assert traced.checkpointed == traced.outside + traced.block_inputs + max(traced.blocks) < traced.plain


def test_parameter_counts_match_the_model():
    _, model = tiny()
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(rank=4, alpha=4))
    counted = count_params(model, list(model.blocks()))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (counted.trainable, counted.frozen) == (trained, sum(p.numel() for p in model.parameters()) - trained)
    assert 0 < trained < counted.frozen


def cost(trainable=1000, frozen=0, act=(100, 300)) -> ModelCost:
    """A hand-made model whose forward keeps `act` bytes at micro batch 1 and 2 (half of it in its one block)."""
    def acts(a):
        return Activations(blocks=[a // 2], in_blocks=a // 2, block_inputs=0, outside=a - a // 2)

    return ModelCost(ParamCount(trainable, frozen, 10), quantisable=frozen, act1=acts(act[0]), act2=acts(act[1]),
                     encoders=[])


def terms(s, c=None, cuda=False):
    return {line.name: line.bytes for line in breakdown(c or cost(), s, cuda=cuda)}


def test_each_term_by_zero_stage_and_precision():
    """Known answers per rank for 1,000 trained parameters on 4 processes."""
    s = Settings(micro_batch=3, checkpointing=False, zero_stage=0, precision="fp32", world=4, accumulating=True,
                 ema_copies=2)
    t = terms(s)
    assert (t["weights"], t["gradients"], t["optimizer state"], t["EMA"]) == (4000, 4000, 8000, 8000)
    assert t["activations"] == 100 + 200 * 2 and "master weights" not in t and "backward overlap" not in t
    assert t["communication buffers"] == 4000  # the all-reduce bucket holds every gradient
    t = terms(s.replace(zero_stage=1, precision="bf16"))
    assert (t["weights"], t["gradients"], t["optimizer state"], t["master weights"]) == (2000, 2000, 2000, 1000)
    t = terms(s.replace(zero_stage=2))
    assert (t["gradients"], t["optimizer state"], t["EMA"]) == (1000, 2000, 8000)
    t = terms(s.replace(zero_stage=3))
    assert (t["weights"], t["gradients"], t["EMA"]) == (1000, 1000, 2000)
    t = terms(s.replace(zero_stage=1, offload_optimizer=True))
    assert t["optimizer state"] == 0
    # Without accumulation the backward frees activations while the gradients fill.
    t = terms(s.replace(accumulating=False))
    assert t["backward overlap"] == -min(t["activations"], t["gradients"])
    assert peak(cost(), s, cuda=False) == sum(terms(s).values())


def test_quantised_base_and_8bit_optimizer_are_priced_per_parameter():
    c = cost(trainable=100, frozen=6400)
    s = Settings(micro_batch=1, checkpointing=False, zero_stage=0, precision="bf16", world=1)
    assert terms(s, c)["weights"] == 6500 * 2
    assert terms(s.replace(base_quant="nf4"), c)["weights"] == 100 * 2 + 6400 // 2 + 6400 // 64 * 4
    assert terms(s.replace(base_quant="int8"), c)["weights"] == 100 * 2 + 6400
    assert terms(s.replace(optimizer="adamw8bit"), c)["optimizer state"] == int(100 * (2 + 8 / 256))
    assert terms(s, c, cuda=True)["allocator headroom"] > 0 and "allocator headroom" not in terms(s, c)


def test_levers_fit_the_budget_with_the_fewest_changes():
    c = ModelCost(ParamCount(1000, 0, 10), 0, Activations([1000] * 5, 5000, 100, 100),
                  Activations([2000] * 5, 10000, 200, 200), [])
    s = Settings(micro_batch=4, checkpointing=False, zero_stage=0, precision="fp32", world=2, accumulating=True)
    room = Room(checkpointable=True, frozen_base=False, encoders=False)
    budget = peak(c, s.replace(checkpointing=True), cuda=False)
    found = fit(c, s, budget, room, cuda=False)
    assert [lv.name for lv in found.levers] == ["activation checkpointing"] and found.peak <= budget
    assert fit(c, s, peak(c, s, cuda=False), room, cuda=False).levers == []
    assert fit(c, s, 10, room, cuda=False) is None
    lever, saved = largest_lever(c, s, room, cuda=False)
    assert lever.name == "activation checkpointing" and saved == peak(c, s, cuda=False) - budget
    m = max_micro(c, s, budget, cuda=False)
    assert peak(c, s.replace(micro_batch=m), cuda=False) <= budget < peak(c, s.replace(micro_batch=m + 1), cuda=False)
    assert {lv.kind for lv in LEVERS} == {"applied", "manual"}


def plan_cli(capsys, *args):
    code = main(["plan", str(ROOT / "recipes" / "digits.yaml"), "train.batch_size=16", *args])
    return code, capsys.readouterr()


def test_plan_cli_json_and_text(capsys):
    code, out = plan_cli(capsys, "--memory-gb", "1", "--json")
    assert code == 0
    plan = json.loads(out.out)
    assert plan["peak_bytes"] == sum(plan["breakdown"].values()) > GIB and plan["fits"] is False
    assert plan["settings"]["micro_batch"] == 16 and plan["parameters"]["trainable"] == 2343012
    # Caching the features would free the 23M bf16 text encoder, too little; checkpointing alone is enough.
    assert plan["breakdown"]["frozen encoders"] == 22713216 * 2
    assert [lv["name"] for lv in plan["fit"]["levers"]] == ["activation checkpointing"]
    assert plan["fit"]["peak_bytes"] <= GIB < plan["peak_bytes"]
    code, out = plan_cli(capsys, "--device", "rtx4080", "--gpus", "2")
    assert code == 0 and "fits" in out.out and "2 processes" in out.out and "per block" in out.out
    code, out = plan_cli(capsys, "--device", "rtx490")
    assert code == 1 and "did you mean 'rtx4090'" in out.err


def test_plan_reads_the_recipes_settings():
    plan = make_plan(digits("train.activation_checkpointing=true", "train.ema_profiles=[0.05]",
                            "distributed.zero_stage=2", "train.micro_batch_size=4"), get_device("h100"), world=2)
    s = plan.settings
    assert (s.checkpointing, s.ema_copies, s.zero_stage, s.micro_batch, s.accumulating) == (True, 2, 2, 4, True)
    assert {line.name: line.bytes for line in plan.lines}["activations"] == plan.cost.activations(4, True)
    with pytest.raises(ValueError, match="trains every weight"):  # a quantised base needs a frozen one
        make_plan(digits(), get_device("h100"), assume={"base_quant": "nf4"}, cost=(plan.cost, plan.sequence))


def test_a_budget_must_be_a_positive_number():
    with pytest.raises(RecipeError, match="memory_budget_gb must be a positive number"):
        digits("distributed.memory_budget_gb=0")


def test_device_table_names_its_sources():
    assert get_device("h200").memory_bytes == 141 * GIB and get_device("rtx4080").memory_gib == 16
    assert all(d.source for d in (get_device(n) for n in ("h100", "a100-40", "a100-80", "l40s", "rtx4090")))
    with pytest.raises(ValueError, match="positive"):
        budget_device(0)


def digits(*overrides):
    return load_recipe(ROOT / "recipes" / "digits.yaml", ["train.batch_size=16", *overrides])


def test_budget_sets_checkpointing_and_micro_batch():
    recipe = digits()
    plan = make_plan(recipe, budget_device(1024, cuda=False))
    s = plan.settings
    # A budget that fits micro batch 8 only with checkpointing: the planner halves the micro batch and checkpoints.
    want = peak(plan.cost, s.replace(micro_batch=8, checkpointing=True, accumulating=True), cuda=False)
    budgeted = apply_budget(digits(f"distributed.memory_budget_gb={want / GIB}"), 1, cuda=False)
    assert budgeted.recipe.train.micro_batch_size == 8 and budgeted.recipe.train.activation_checkpointing
    assert "train.micro_batch_size: 8" in budgeted.message
    with pytest.raises(RecipeError, match="over by .* the largest lever left is cached features"):
        apply_budget(digits("distributed.memory_budget_gb=0.001"), 1, cuda=False)


def test_train_applies_the_budget(tmp_path, digit_shards, capsys):
    """distributed.memory_budget_gb reaches the trainer: the run's saved recipe holds what the planner chose."""
    recipe = tiny_recipe(tmp_path / "run", digit_shards, **{"train.max_steps": 1, "train.checkpoint_every": 1})
    plan = make_plan(recipe, budget_device(1024, cuda=False))
    want = peak(plan.cost, plan.settings.replace(micro_batch=4, checkpointing=True, accumulating=True), cuda=False)
    recipe.distributed.memory_budget_gb = want / GIB
    train(recipe)
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved.train.micro_batch_size == 4 and saved.train.activation_checkpointing
    assert "memory budget" in capsys.readouterr().out


def test_paired_data_adds_the_reference_tokens_to_the_trace():
    """Bug caught: the trace feeding an editing family no reference image (its activations planned as a
    text-to-image model's). Kontext's tiny preset on paired digits: one reference of the target's 16 tokens."""
    recipe = digits("model.preset=tiny-flux-kontext-dev", "data.paired=true")
    cost, seq, _ = model_cost(recipe)
    unpaired, _, _ = model_cost(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, paired=False)))
    assert (seq.references, seq.reference_tokens, seq.image_tokens) == (1, 16, 16)
    assert cost.activations(1, False) > unpaired.activations(1, False)
    assert cost.act2.plain > unpaired.act2.plain


def test_released_qwen_image_and_kontext_folders_are_known():
    """Bugs caught: Qwen-Image's text encoder counted without its vision tower or head, its VAE read as an
    AutoencoderKL (or its downsampling taken from a key it has not), Kontext's folders unknown."""
    part, shape = frozen.text_encoder("qwen", TextEncoderConfig(kind="decoder_llm", name_or_path="Qwen/Qwen-Image",
                                                                subfolder="text_encoder", pooling="none"), "key")
    assert part.params == 8_292_166_656 and (shape.hidden, shape.pooled) == (3584, 0)  # the model card's 8.29B
    vae = frozen.autoencoder(AutoencoderConfig(kind="vae", name_or_path="Qwen/Qwen-Image", subfolder="vae"))
    assert (vae.downsample, vae.channels) == (8, 16) and 120e6 < vae.part.params < 130e6
    assert frozen.RELEASED["black-forest-labs/FLUX.1-Kontext-dev"] == frozen.RELEASED["black-forest-labs/FLUX.1-dev"]
