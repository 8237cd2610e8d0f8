"""benchmarks/mmdit_step.py times both models' training steps, eager and compiled, on weights that agree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("mmdit_step_benchmark",
                                               Path(__file__).parents[1] / "benchmarks" / "mmdit_step.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["mmdit_step_benchmark"] = bench
_SPEC.loader.exec_module(bench)

TINY = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--latent-size", "8", "--latent-channels", "4",
        "--text-len", "5", "--context-dim", "16", "--pooled-dim", "8", "--batch", "2", "--steps", "2",
        "--warmup", "1", "--peak-size", "64"]


@pytest.mark.slow  # traces forward and backward of both models
def test_eager_and_compiled_columns_time_equal_models(capsys):
    # aot_eager traces forward and backward as inductor does but generates no code: seconds, not minutes.
    results = bench.main([*TINY, "--compile", "--compile-backend", "aot_eager"])
    assert sorted(results) == ["compiled", "eager"]
    for r in results.values():
        assert r["ours"] > 0 and r["diffusers"] > 0 and abs(r["ratio"] - r["ours"] / r["diffusers"]) < 1e-12
        assert r["err"] < 1e-5
    out = capsys.readouterr().out
    assert "--- eager" in out and "--- compiled" in out and "compiled " in out.splitlines()[-1]
