"""benchmarks/layouts.py: every text-to-image family's layout at the digits recipe's parameter count, the recipe
overrides that give it, the CPU-time plan, and a smoke run of the whole machinery at a tiny budget."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from flowmatch.config import load_recipe
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.families import FAMILIES, family_of

_SPEC = importlib.util.spec_from_file_location("layouts_benchmark",
                                               Path(__file__).parents[1] / "benchmarks" / "layouts.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["layouts_benchmark"] = bench
_SPEC.loader.exec_module(bench)

RECIPE = str(Path(__file__).parents[1] / "recipes" / "digits.yaml")
#: The layouts issue 26 compares: dual-stream, hybrid, single-stream with refiners (two), shared modulation.
NAMED = ("sd3", "flux", "zimage", "lumina2", "flux2")


@pytest.fixture(scope="module")
def table():
    return bench.layouts(RECIPE, [], 0.05)


def test_every_text_to_image_family_gives_a_layout_at_the_recipes_size(table):
    target, layouts = table
    assert target == "sd3" and list(layouts)[0] == "sd3" and layouts["sd3"].overrides == []
    expected = {n for n, f in FAMILIES.items() if f.kind == "mmdit" and not f.capabilities.references}
    assert set(layouts) == expected  # from the registry: a new family joins without an edit
    for name in NAMED:
        assert abs(layouts[name].params / layouts["sd3"].params - 1) <= 0.05, (name, layouts[name])
    assert layouts["flux"].blocks.endswith("single") and "refiner" in layouts["zimage"].blocks


def test_the_overrides_build_that_family_at_that_size_from_the_recipe(table):
    """What `flowmatch train RECIPE OVERRIDES` builds is the layout the search counted: the family, its blocks and
    its parameter count (the encoders fill the sizes, pooled or not, as in training)."""
    _, layouts = table
    for name in NAMED:
        recipe = load_recipe(RECIPE, layouts[name].overrides)
        assert family_of(recipe.model).name == name
        encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels)
        cfg = encoders.fill_model_config(recipe.model)
        assert bench.parameter_count(FAMILIES[name], cfg.architecture()) == layouts[name].params, name
        assert cfg.num_heads * cfg.head_dim == 128 and not cfg.guidance_embed


def test_rope_axes_scale_to_the_recipes_head_width():
    target = dataclasses.replace(load_recipe(RECIPE, []).model.architecture(), in_channels=1, context_dim=384,
                                 pooled_dim=384)
    assert bench.adapted(FAMILIES["flux2"], target)["rope_axes_dim"] == [8, 8, 8, 8]  # tiny: [4, 4, 4, 4] of 16
    assert bench.adapted(FAMILIES["zimage"], target)["pooled_dim"] == 0  # takes none: stays none
    with pytest.raises(ValueError, match="do not scale"):
        bench.adapted(FAMILIES["flux"], dataclasses.replace(target, head_dim=24))


def test_the_plan_fits_the_whole_schedule_in_the_cpu_budget():
    assert bench.planned_steps(bench.Calibration(0.1, 10.0), 60.0, 500, 100) == (500, 100)
    assert bench.planned_steps(bench.Calibration(0.25, 10.0), 60.0, 500, 100) == (200, 40)
    assert bench.planned_steps(bench.Calibration(5.0, 100.0), 60.0, 500, 100) == (1, 0)
    # the default budget is the target's whole schedule, which must plan back to every step despite the rounding
    cal = bench.Calibration(0.6288553577578927, 11.674835394132742)  # (budget - fixed) / per step = 499.99999999999994
    assert bench.planned_steps(cal, cal.overhead_s + 500 * cal.cpu_per_step, 500, 100) == (500, 100)


@pytest.mark.slow
def test_smoke_a_layout_trains_within_its_cpu_budget_and_is_judged(digit_shards, tmp_path, capsys):
    budget = 16.0
    results = bench.main(["--only", "flux2", "--budget-s", str(budget), "--calibration-steps", "4", "--samples",
                          "1", "--steps", "1", "--shards", str(digit_shards), "--out", str(tmp_path / "runs"),
                          "train.batch_size=16", "train.ema_profiles=[]", "train.ema_snapshot_every=0"])
    (row,) = results
    assert row["layout"] == "flux2" and 1 <= row["trained_steps"] <= row["planned_steps"]
    assert row["cpu_s"] <= budget + 5.0  # the plan fits; the hard stop allows one step and a checkpoint more
    assert 0.0 <= row["metrics"][1]["accuracy"] <= 1.0 and row["metrics"][1]["frechet"] > 0
    assert "flux2" in capsys.readouterr().out.split("steps/CPU-s")[1]
