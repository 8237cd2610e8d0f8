"""benchmarks/sampling.py runs both libraries on one pipeline folder and reports a ratio per step count."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("sampling_benchmark",
                                               Path(__file__).parents[1] / "benchmarks" / "sampling.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["sampling_benchmark"] = bench
_SPEC.loader.exec_module(bench)


def test_both_libraries_generate_and_the_ratio_is_theirs(tiny_sd3_pipeline, capsys):
    """The ratio is the median of the repeats' ratios, each of every batch's time through both libraries. Bugs
    caught: a ratio turned upside down, a repeat left out of the median."""
    results = bench.main(["--pipeline", str(tiny_sd3_pipeline), "--prompts", "3", "--batch", "2", "--steps", "1,2",
                          "--size", "32", "--repeats", "2"])
    assert sorted(results) == [1, 2]
    for r in results.values():
        assert r["ours"] > 0 and r["diffusers"] > 0 and len(r["ratios"]) == 2
        assert r["ratio"] == pytest.approx(statistics.median(r["ratios"]))
        for ratio, seconds in zip(r["ratios"], r["seconds"]):  # a repeat's ratio: their time over ours
            assert ratio == pytest.approx(seconds["diffusers"] / seconds["ours"])
        assert r["ours"] == pytest.approx(3 / statistics.median(s["ours"] for s in r["seconds"]))
        for c in r["components"].values():  # the components add up to each library's time per image
            assert c["encode"] > 0 and c["decode"] > 0
            assert c["steps"] == pytest.approx(c["total"] - c["encode"] - c["decode"])
    out = capsys.readouterr().out
    assert out.count("images/s") == 4 and out.count("transformer steps") == 2 and "text encoding" in out


def test_the_cpu_clock_is_the_process_time_and_tiny_runs_one_thread():
    """On CPU the default clock is the process's CPU time (a loaded machine does not inflate it); --tiny is the
    quoted command, one thread by default."""
    assert bench.clock_of("auto", bench.torch.device("cpu")) is bench.time.process_time
    assert bench.clock_of("wall", bench.torch.device("cpu")) is bench.time.perf_counter
    assert bench.clock_of("auto", bench.torch.device("cuda")) is bench.time.perf_counter
    args = bench.parse_args(["--tiny"])
    assert (args.threads, args.steps, args.prompts, args.batch, args.repeats) == (1, [8, 28], 32, 8, 3)
