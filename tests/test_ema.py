"""The EMA: power-function profiles, the warm-up, its update count on resume, and post-hoc EMA.

The engine tests build a real one-process :class:`Engine` in this process (ZeRO 0 and 2) on a toy regression.
Post-hoc tolerance: a reconstruction differs from a directly tracked EMA of the same sigma_rel only by the
integral of the trajectory against the profile misfit, which shrinks with denser snapshots; it is measured in
units of how far apart the two tracked profiles' EMAs are (the differences post-hoc EMA is there to choose
between): with a snapshot every 10 of 120 steps, 0.10% between the tracked widths (0.075) and 0.19% beyond them
(0.15) (measured), against a 2% bound, while taking the nearer tracked profile instead would be 50% or more off.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flowmatch.checkpoint import load_checkpoint, read_layout, save_checkpoint
from flowmatch.checkpoint.manifest import describe_files, read_manifest, write_manifest
from flowmatch.engine import DistributedConfig, Engine, OptimConfig
from flowmatch.engine.ema import ShadowEma
from flowmatch.engine.power_ema import gamma_of, power_decay, reconstruct, sigma_rel_of, warmup_decay
from flowmatch.posthoc import ema_name, list_snapshots, reconstruct_ema, restore_profiles, write_snapshot

_OPTIM = OptimConfig(lr=0.02, warmup_steps=0, schedule="constant", grad_clip=0.0)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3) -> (B, 1)
        return self.head(torch.relu(self.hidden(x)))


@contextlib.contextmanager
def _toy_engine(zero_stage: int = 0):
    torch.manual_seed(0)
    engine = Engine(DistributedConfig(zero_stage=zero_stage))
    try:
        model = _Toy()
        engine.setup(model, model.parameters(), _OPTIM, max_steps=1000, micro_batch_size=8, grad_accum_steps=1)
        yield engine
    finally:
        engine.shutdown()


def _step(engine: Engine, gen: torch.Generator) -> None:
    x = torch.randn(8, 3, generator=gen)
    y = x.sum(1, keepdim=True).sin()
    engine.backward((engine.forward(x) - y).pow(2).mean())
    assert engine.step().stepped
    engine.ema.update()


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].double().flatten() for k in sorted(weights)])


# ---------------------------------------------------------------------------------------------- the arithmetic


def test_sigma_rel_and_gamma_are_karras_pairs_and_round_trip():
    # Karras et al. 2024 track gamma 16.97 and 6.94, i.e. sigma_rel 0.05 and 0.10.
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma)) == pytest.approx(sigma, rel=1e-12)
    for bad in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match="sigma_rel must lie in"):
            gamma_of(bad)


def test_the_power_ema_weighs_each_step_by_its_slice_of_the_profile():
    # Updating with beta_n = (1 - 1/n)^(gamma+1) gives step k the weight (k^(g+1) - (k-1)^(g+1)) / n^(g+1): the
    # continuous profile integrated over (k-1, k]. Post-hoc EMA relies on this being exact.
    gamma, n = gamma_of(0.1), 30
    average = np.zeros(n)
    for step in range(1, n + 1):
        beta = power_decay(step, gamma)
        average = beta * average + (1 - beta) * np.eye(n)[step - 1]  # one-hot trajectory: the weights themselves
    k = np.arange(1, n + 1)
    np.testing.assert_allclose(average, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1), rtol=1e-12)
    assert power_decay(1, gamma) == 0.0  # the first update copies the weights


def test_the_warmup_is_the_power_profile_until_the_cap():
    gamma = gamma_of(0.1)
    assert warmup_decay(1, 0.999, gamma) == 0.0
    assert warmup_decay(50, 0.999, gamma) == power_decay(50, gamma) < 0.9
    assert warmup_decay(10_000, 0.999, gamma) == 0.999  # past (gamma + 1) / (1 - decay) = 7,937 updates
    assert warmup_decay(3, 0.999, None) == 0.999


def test_reconstruction_is_exact_for_a_tracked_profile_and_a_weighted_average():
    sources = [(t, gamma_of(s)) for t in (10, 20, 30) for s in (0.05, 0.1)]
    exact = reconstruct(sources, (30, gamma_of(0.1)))
    np.testing.assert_allclose(exact.coefficients, np.eye(6)[5], atol=1e-9)
    assert exact.residual < 1e-6
    between = reconstruct(sources, (30, gamma_of(0.075)))
    assert between.coefficients.sum() == pytest.approx(1.0, abs=1e-12) and 0 < between.residual < 0.05


# -------------------------------------------------------------------------------------------- the engine's EMA


def test_engine_ema_is_none_until_init_and_refuses_training_while_swapped_in():
    """Bugs caught: ``engine.ema`` not the object ``init_ema`` returned; an update, a training step or an export
    of the training weights allowed while the EMA weights are in the model; a swap that does not restore the
    training weights exactly."""
    gen = torch.Generator().manual_seed(1)
    with _toy_engine() as engine:
        assert engine.ema is None
        ema = engine.init_ema(0.5)
        assert engine.ema is ema
        _step(engine, gen)
        live = _flat(engine.model_state_dict())
        with ema.weights():
            with pytest.raises(RuntimeError, match="swapped in"):
                engine.model_state_dict()
            with pytest.raises(RuntimeError, match="swapped in"):
                ema.update()
            with pytest.raises(RuntimeError, match="swapped in"):
                engine.backward(engine.forward(torch.zeros(8, 3)).sum())
        assert torch.equal(_flat(engine.model_state_dict()), live)
        assert ema.updates == 1



def test_warmup_ema_is_the_formulas_average_and_close_to_the_raw_weights_after_50_steps():
    """Bugs caught: no warm-up (the EMA still 95% initial weights after 50 updates at 0.999), a count that does
    not advance, or a decay other than the formula's."""
    gen = torch.Generator().manual_seed(1)
    with _toy_engine() as engine:
        engine.init_ema(0.999, warmup=0.1)
        initial = _flat(engine.model_state_dict())
        trajectory = []
        for _ in range(50):
            _step(engine, gen)
            trajectory.append(_flat(engine.model_state_dict()))
        ema = _flat(engine.ema.state_dict())
        assert engine.ema.updates == 50
    gamma, n = gamma_of(0.1), 50
    k = torch.arange(1, n + 1, dtype=torch.float64)
    weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1)  # no weight left on the initial ones
    expected = (weights[:, None] * torch.stack(trajectory)).sum(0)
    torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6)
    raw = trajectory[-1]
    moved = (raw - initial).norm()
    assert (ema - raw).norm() < 0.2 * moved  # measured: 0.11
    no_warmup = 0.999 ** n * initial + sum((1 - 0.999) * 0.999 ** (n - i) * w for i, w in enumerate(trajectory, 1))
    assert (no_warmup - raw).norm() > 0.9 * moved  # measured 0.97, as the issue reported: still the initial weights


@pytest.mark.parametrize("resume_stage", [0, 2])
def test_the_update_count_survives_resume_in_the_same_and_another_layout(tmp_path, resume_stage):
    """Bug caught: the count not saved or restored, so that a resumed EMA starts its warm-up over (its next update
    would copy the weights). ZeRO-2 on resume takes the other-layout path (consolidated EMA + engine.json)."""
    gen = torch.Generator().manual_seed(2)
    with _toy_engine() as engine:
        engine.init_ema(0.999, warmup=0.1)
        for _ in range(3):
            _step(engine, gen)
        saved_ema = engine.ema.state_dict()
        save_checkpoint(engine, tmp_path, 3, client_state={"step": 3}, recipe_yaml="", keep=1, ema=True)
    assert read_layout(tmp_path).ema_updates == 3
    with _toy_engine(zero_stage=resume_stage) as engine:
        engine.init_ema(0.999, warmup=0.1)
        load_checkpoint(engine, tmp_path / "checkpoints" / "3")
        assert engine.ema.updates == 3
        _step(engine, gen)
        beta = warmup_decay(4, 0.999, gamma_of(0.1))
        expected = beta * _flat(saved_ema) + (1 - beta) * _flat(engine.model_state_dict())
        torch.testing.assert_close(_flat(engine.ema.state_dict()), expected, rtol=0, atol=1e-6)


def test_states_without_a_count_take_the_optimizer_steps(tmp_path):
    gen = torch.Generator().manual_seed(3)
    with _toy_engine() as engine:
        engine.init_ema(0.999, warmup=0.1)
        for _ in range(2):
            _step(engine, gen)
        save_checkpoint(engine, tmp_path, 2, client_state={"step": 2}, recipe_yaml="", keep=1, ema=True)
    meta_file = tmp_path / "checkpoints" / "2" / "state" / "engine.json"
    meta = json.loads(meta_file.read_text())
    del meta["ema_updates"]  # as written before the count was recorded
    meta_file.write_text(json.dumps(meta))
    ckpt = tmp_path / "checkpoints" / "2"
    files = {**read_manifest(ckpt), **describe_files(ckpt, [meta_file], rank=0)}  # the edit, as if written so
    write_manifest(ckpt, 2, files)
    with _toy_engine() as engine:
        engine.init_ema(0.999, warmup=0.1)
        load_checkpoint(engine, tmp_path / "checkpoints" / "2")
        assert engine.ema.updates == 2


# ----------------------------------------------------------------------------------------------- post-hoc EMA


def test_posthoc_ema_matches_a_directly_tracked_ema(tmp_path):
    """`flowmatch ema`'s reconstruction against EMAs of the same sigma_rel tracked step by step (see the module
    docstring for the tolerance). Bugs caught: a wrong profile time (step vs updates), a wrong gamma, coefficients
    applied to the wrong snapshot, a profile lost from the snapshot files."""
    targets = (0.075, 0.15)
    gen = torch.Generator().manual_seed(4)
    with _toy_engine() as engine:
        engine.init_ema(0.999, warmup=0.1, profiles=[0.05, 0.10])
        live = [p.detach() for p in engine.module.parameters()]
        direct = [ShadowEma(live, 0.0) for _ in targets]
        for step in range(1, 121):
            _step(engine, gen)
            for sigma, shadow in zip(targets, direct):
                shadow.update(live, power_decay(step, gamma_of(sigma)))
            if step % 10 == 0:
                write_snapshot(engine, tmp_path, step, [0.05, 0.10])
        names = [name for name, _ in engine.module.named_parameters()]
        tracked = [_flat(w) for w in engine.ema.profile_state_dicts()]
    assert [s.step for s in list_snapshots(tmp_path)] == list(range(10, 121, 10))
    made = reconstruct_ema(tmp_path, [*targets, 0.10])
    assert [m.name for m in made] == [ema_name(s) for s in (*targets, 0.10)] and made[0].snapshots == 12
    scale = (tracked[0] - tracked[1]).norm()
    for m, shadow in zip(made, direct):
        got = _flat(load_file(str(m.path)))
        want = _flat(dict(zip(names, shadow.shadow)))
        assert (got - want).norm() < 0.02 * scale, m.name
        assert min((t - want).norm() for t in tracked) > 0.4 * scale  # the tracked ones alone would not do
    torch.testing.assert_close(_flat(load_file(str(made[-1].path))), tracked[1], rtol=0, atol=1e-6)


def test_resume_restores_the_profiles_of_its_step_and_drops_later_snapshots(tmp_path):
    """Bugs caught: profiles restarted (or taken from another step) on resume; snapshots of an abandoned attempt
    left behind for `flowmatch ema` to mix into the resumed run's."""
    gen = torch.Generator().manual_seed(5)
    with _toy_engine() as engine:
        engine.init_ema(0.999, profiles=[0.05, 0.10])
        for step in range(1, 4):
            _step(engine, gen)
            write_snapshot(engine, tmp_path, step, [0.05, 0.10])
            if step == 2:
                at_two = engine.ema.profile_state_dicts()
    with _toy_engine() as engine:
        engine.init_ema(0.999, profiles=[0.05, 0.10])
        said = restore_profiles(engine, tmp_path, 2, [0.05, 0.10])
        assert "restored" in said and engine.ema.profile_updates == 2
        assert [s.step for s in list_snapshots(tmp_path)] == [1, 2]
        for got, want in zip(engine.ema.profile_state_dicts(), at_two):
            assert all(torch.equal(got[k], want[k]) for k in want)
        said = restore_profiles(engine, tmp_path, 2, [0.05, 0.20])  # other profiles: they start over
        assert "start over" in said and engine.ema.profile_updates == 0


def test_posthoc_needs_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.ema_profiles"):
        reconstruct_ema(Path(tmp_path), [0.1])


def test_a_full_disk_while_writing_a_snapshot_is_a_clear_error(tmp_path, monkeypatch):
    """Bug caught: the snapshot written with a writer whose full-disk error is an opaque serialisation error (or
    leaving its temporary file behind)."""
    import errno
    from types import SimpleNamespace

    from flowmatch import posthoc
    from flowmatch.checkpoint import CheckpointError

    def full(path, tensors, metadata=None):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(posthoc, "write_safetensors", full)
    layer = torch.nn.Linear(2, 2)
    ema = SimpleNamespace(profile_updates=3,
                          profile_state_dicts=lambda: [{k: v.detach() for k, v in layer.state_dict().items()}])
    engine = SimpleNamespace(is_main=True, module=layer, ema=ema)
    with pytest.raises(CheckpointError, match="no space left on the device of .*EMA snapshot of step 7"):
        posthoc.write_snapshot(engine, tmp_path, 7, [0.1])
    assert not list((tmp_path / "ema" / "snapshots").iterdir())
