"""benchmarks/memory.py: its CPU smoke path plans and trains a tiny model in this process and reports both peaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("memory_bench", Path(__file__).parents[1] / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(_SPEC)
sys.modules["memory_bench"] = memory
_SPEC.loader.exec_module(memory)


def test_the_cpu_smoke_path_plans_and_measures(capsys):
    result = memory.main(["--smoke"])
    # The plan it compares with is the breakdown it prints (the encoders are not loaded, so not counted).
    assert result["planned"] == sum(result["breakdown"].values()) > 0
    # In this process the allocator may reuse freed memory, so the measured peak can be 0 here (the benchmark
    # measures each case in a fresh process).
    assert result["trained"] == result["parameters"] > 0 and result["measured"] >= 0
    assert "ratio" in capsys.readouterr().out
