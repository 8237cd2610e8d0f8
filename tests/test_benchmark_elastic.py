"""benchmarks/elastic.py: its CPU smoke run resumes one ZeRO-0 process's checkpoint on two ZeRO-3 processes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("elastic_bench", Path(__file__).parents[1] / "benchmarks" / "elastic.py")
elastic_bench = importlib.util.module_from_spec(_SPEC)
sys.modules["elastic_bench"] = elastic_bench  # dataclasses look their module up there
_SPEC.loader.exec_module(elastic_bench)


@pytest.mark.slow
def test_one_to_two_zero3_processes_resumes_with_the_same_moments_and_losses(tmp_path, capsys):
    (row,) = elastic_bench.main(["--cases", "1z0-2z3", "--precisions", "fp32", "--resume-at", "2", "--after", "3",
                                 "--work-dir", str(tmp_path)])
    assert row.moments == 0.0 and not row.reset  # bitwise, through ZeRO-3's padded slices (width 37)
    assert row.loss_rel < 1e-5 and row.loss_rel_src < 1e-5
    assert "1xZ0->2xZ3 fp32" in capsys.readouterr().out
