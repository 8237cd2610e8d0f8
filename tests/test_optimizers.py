"""The lean optimizers (``optim.name``: adamw8bit, adafactor) and the fused backward: each resumes bit-identically
from a checkpoint written without pickles, the fused backward computes the unfused updates, and the combinations
that cannot work are refused by name.

Each run is a one-process ZeRO-0 engine in this process on a model whose first matrix has 8192 elements, above
bitsandbytes' 4096-element threshold for 8-bit moments, so its 8-bit state really is exercised.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.engine import optimizers as optimizers_module
from flowmatch.errors import RecipeError

STEPS, MORE = 3, 2


def _optim(name: str, fused: bool = False) -> OptimConfig:
    return OptimConfig(name=name, lr=0.01, warmup_steps=0, schedule="cosine", weight_decay=0.01,
                       grad_clip=0.0, fused_backward=fused)


def _engine(optim: OptimConfig, seed: int, accum: int = 1, **distributed) -> Engine:
    torch.manual_seed(seed)
    engine = Engine(DistributedConfig(**distributed))
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 4))
    engine.setup(model, model.parameters(), optim, max_steps=10, micro_batch_size=4, grad_accum_steps=accum)
    return engine


def _steps(engine: Engine, n: int, seed: int, accum: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        for _ in range(accum):
            loss = engine.forward(torch.randn(4, 64, generator=gen)).pow(2).mean()
            engine.backward(loss)
            losses.append(loss.item())
        assert engine.step().stepped
    return losses


def _optimizer_tensors(engine: Engine) -> dict[str, torch.Tensor]:
    tensors, _ = engine._require_setup().optimizer_state()
    return tensors


NAMES = ["adamw", "adamw8bit", "adafactor"]


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path, name, fused):
    # Fails if the optimizer's state is not saved or not restored (a resumed 8-bit/Adafactor state from zero
    # differs at the first update), or if the schedule position is lost.
    optim = _optim(name, fused)
    engine = _engine(optim, seed=0)
    _steps(engine, STEPS, seed=1)
    engine.save(tmp_path / "state", {"step": STEPS})
    save_file(engine.model_state_dict(), str(tmp_path / "model.safetensors"))
    assert _optimizer_tensors(engine), "the optimizer saved no tensor state"
    ref_losses = _steps(engine, MORE, seed=2)
    ref_weights, ref_state = engine.model_state_dict(), _optimizer_tensors(engine)
    engine.shutdown()

    engine = _engine(optim, seed=7)  # other initial weights: everything must come from the checkpoint
    engine.load(tmp_path / "state", weights=tmp_path / "model.safetensors")
    assert engine.optimizer_steps == STEPS
    losses = _steps(engine, MORE, seed=2)
    weights, state = engine.model_state_dict(), _optimizer_tensors(engine)
    engine.shutdown()
    assert losses == ref_losses
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


@pytest.mark.parametrize("name", NAMES)
def test_fused_backward_applies_the_same_updates_and_frees_each_gradient(name):
    # Fails if the fused updates run at every micro-batch of a window (not only the last), skip the schedule's lr,
    # or leave the gradients allocated after backward.
    accum = 2
    plain = _engine(_optim(name), seed=0, accum=accum)
    plain_losses = _steps(plain, STEPS, seed=1, accum=accum)
    expected = plain.model_state_dict()
    plain.shutdown()
    fused = _engine(_optim(name, fused=True), seed=0, accum=accum)
    fused_losses = _steps(fused, STEPS, seed=1, accum=accum)
    got = fused.model_state_dict()
    assert all(p.grad is None for p in fused.module.parameters())
    fused.shutdown()
    assert fused_losses == plain_losses
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-7)


def test_fused_backward_discards_a_non_finite_window():
    engine = _engine(_optim("adamw", fused=True), seed=0)
    _steps(engine, 1, seed=1)
    before = engine.model_state_dict()
    engine.backward(engine.forward(torch.randn(4, 64)).pow(2).mean() * float("inf"))
    result = engine.step()
    after = engine.model_state_dict()
    assert (result.stepped, result.skipped, engine.optimizer_steps) == (False, True, 1)
    assert all(torch.equal(before[k], after[k]) for k in before)
    _steps(engine, 1, seed=2)  # and training goes on
    engine.shutdown()


def test_an_unknown_optimizer_names_the_allowed_ones():
    with pytest.raises(ValueError, match="adamw8bit.*did you mean 'adamw8bit'"):
        OptimConfig(name="adamw_8bit")


def test_a_missing_backend_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(optimizers_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        OptimConfig(name="adamw8bit")


def test_fused_backward_refuses_clipping():
    with pytest.raises(ValueError, match="grad_clip: 0"):
        OptimConfig(fused_backward=True, grad_clip=1.0)


@pytest.mark.parametrize(("optim", "distributed", "words"), [
    (_optim("adamw", fused=True), {"zero_stage": 2}, "fused_backward: true needs distributed.zero_stage: 0"),
    (_optim("adamw", fused=True), {"precision": "bf16"}, "precision: fp32"),
    (_optim("adafactor"), {"zero_stage": 1}, "cannot factor"),
])
def test_combinations_that_cannot_work_are_refused(optim, distributed, words):
    with pytest.raises(RecipeError, match=words):
        _engine(optim, seed=0, **distributed)


def test_another_layout_restarts_a_lean_optimizer_state_saying_why(tmp_path, caplog):
    # Fails if the elastic path reads AdamW rows for an 8-bit optimizer (a KeyError or garbage moments) instead of
    # restarting its state with a warning that names the optimizer.
    engine = _engine(_optim("adamw8bit"), seed=0)
    _steps(engine, 2, seed=1)
    engine.save(tmp_path / "state", {})
    save_file(engine.model_state_dict(), str(tmp_path / "model.safetensors"))
    assert not list((tmp_path / "state").glob("optim-full*"))  # only AdamW's state has a whole-tensor form
    want = engine.model_state_dict()
    engine.shutdown()
    engine = _engine(_optim("adamw8bit"), seed=7, zero_stage=1)
    with caplog.at_level("WARNING"):
        engine.load(tmp_path / "state", weights=tmp_path / "model.safetensors")
    assert "optim.name adamw8bit keeps a state whose layout follows the ZeRO partitions" in caplog.text
    got = engine.model_state_dict()
    assert engine.optimizer_steps == 2 and all(torch.equal(got[k], want[k]) for k in want)
    _steps(engine, 1, seed=2)  # and it trains on
    engine.shutdown()
