"""benchmarks/sampling.py runs both libraries on one pipeline folder and reports a ratio per step count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("sampling_benchmark",
                                               Path(__file__).parents[1] / "benchmarks" / "sampling.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["sampling_benchmark"] = bench
_SPEC.loader.exec_module(bench)


def test_both_libraries_generate_and_the_ratio_is_theirs(tiny_sd3_pipeline, capsys):
    results = bench.main(["--pipeline", str(tiny_sd3_pipeline), "--prompts", "3", "--batch", "2", "--steps", "1,2",
                          "--size", "32"])
    assert sorted(results) == [1, 2]
    for r in results.values():
        assert r["ours"] > 0 and r["diffusers"] > 0 and abs(r["ratio"] - r["ours"] / r["diffusers"]) < 1e-12
        for c in r["components"].values():  # the components add up to each library's time per image
            assert c["encode"] > 0 and c["decode"] > 0
            assert c["steps"] == pytest.approx(c["total"] - c["encode"] - c["decode"])
    out = capsys.readouterr().out
    assert out.count("images/s") == 4 and out.count("transformer steps") == 2 and "text encoding" in out
