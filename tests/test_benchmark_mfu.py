"""benchmarks/mfu.py: its CPU smoke path runs real training steps through the engine and reports consistent figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location("mfu", Path(__file__).parents[1] / "benchmarks" / "mfu.py")
mfu = importlib.util.module_from_spec(_SPEC)
sys.modules["mfu"] = mfu  # dataclasses look their module up there
_SPEC.loader.exec_module(mfu)

SMOKE = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--text-len", "8", "--batch", "2",
         "--warmup", "1", "--steps", "1", "--peak-size", "64"]


def test_the_cpu_path_trains_and_reports_each_token_count(capsys):
    results = mfu.main([*SMOKE, "--tokens", "16,64"])
    assert [m.tokens for m in results] == [16, 64]
    for m in results:
        # One timed step: its time is the sum of its phases, each of which ran.
        assert m.step == pytest.approx(m.forward + m.backward + m.optimizer)
        assert min(m.forward, m.backward, m.optimizer) > 0 and m.peak_memory > 0
    # Four times the image tokens cost more FLOPs (the estimate sees the token count).
    assert results[1].flops > 2 * results[0].flops
    out = capsys.readouterr().out
    assert out.count("MFU") == 2 and "of the measured fp32 matmul peak" in out


def test_each_step_updates_the_weights(monkeypatch):
    """The timed optimizer phase is the engine's real step: the weights move."""
    seen = {}
    build = mfu.build_model

    def keep(args, engine):
        model = build(args, engine)
        seen["model"], seen["before"] = model, [p.detach().clone() for p in model.parameters()]
        return model

    monkeypatch.setattr(mfu, "build_model", keep)
    mfu.main([*SMOKE, "--tokens", "16"])
    # adaLN-Zero: at first only the zero-initialised layers receive gradients, so only some weights move.
    assert any(not torch.equal(a, p) for a, p in zip(seen["before"], seen["model"].parameters()))


def test_datasheet_peaks_match_pcie_before_sxm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert mfu.datasheet_peak(torch.device("cuda"))[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu.datasheet_peak(torch.device("cuda"))[0] == 989e12
    assert mfu.datasheet_peak(torch.device("cpu")) is None


def test_token_counts_must_be_squares():
    with pytest.raises(SystemExit):
        mfu.parse_args(["--tokens", "16,50"])
