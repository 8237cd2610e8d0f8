"""`flowmatch eval`: generic metrics against known answers, and how a task's judge is called and reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from data_tools.digits import captions_for, heldout_prompts
from data_tools.digits_task import TASK as DIGITS
from data_tools.digits_task import to_digit_features
from flowmatch.config import load_recipe
from flowmatch.evaluate import EvalPlan, EvalRow, TaskScores, evaluate, format_report, frechet_distance
from flowmatch.tasks import Task, register_task, unregister_task

ROOT = Path(__file__).resolve().parents[1]


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 6))
    b = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert abs(frechet_distance(a, b) - reference) < 1e-8 * max(1.0, reference)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_and_blank_pixels():
    # Independent dims with variances s1, s2: FD = |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2; a constant (blank)
    # dimension makes the covariances singular and adds nothing.
    rng = np.random.default_rng(1)
    n = 200_000
    a = np.stack([rng.normal(0, 1, n), rng.normal(2, 3, n), np.zeros(n)], 1)
    b = np.stack([rng.normal(1, 2, n), rng.normal(2, 3, n), np.zeros(n)], 1)
    expected = 1.0 + (1 - 2) ** 2 + 0.0
    assert abs(frechet_distance(a, b) - expected) < 0.05


def test_digit_features_pool_to_8x8_on_the_0_to_16_scale():
    ones = torch.ones(2, 1, 16, 16)
    feats = to_digit_features(ones)
    assert feats.shape == (2, 64) and np.allclose(feats, 16.0)
    checker = torch.zeros(1, 1, 16, 16)
    checker[..., ::2, ::2] = 1.0  # one bright pixel in each 2x2 block -> a quarter of full intensity
    assert np.allclose(to_digit_features(checker), 4.0)


class FakePipeline:
    """Stands in for flowmatch.Pipeline through the public API a judge may use: generate, last_nfe, recipe."""

    def __init__(self, recipe, draw):
        self.recipe, self.draw, self.calls, self.last_nfe = recipe, draw, [], 0

    def generate(self, prompts, *, steps=None, solver=None, seed=0, guidance_scale=None):
        self.calls.append({"n": len(prompts), "steps": steps, "solver": solver, "seed": seed, "scale": guidance_scale})
        self.last_nfe = 2 * (steps or self.recipe.sampling.steps)
        return torch.stack([self.draw(p, seed + i) for i, p in enumerate(prompts)])


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint directory that verifies (meta.json and its manifest); the fake pipeline loads nothing."""
    from flowmatch.checkpoint.manifest import describe_files, write_manifest

    (tmp_path / "meta.json").write_text("{}")
    write_manifest(tmp_path, 0, describe_files(tmp_path, [tmp_path / "meta.json"], rank=0))
    return tmp_path


def digit_recipe(*overrides: str):
    return load_recipe(ROOT / "recipes" / "digits.yaml", ["eval.likelihood_samples=0", *overrides])


def test_eval_hands_the_task_judge_its_plan_and_reports_what_it_returns(checkpoint):
    seen = []

    def judge(pipe, plan: EvalPlan) -> TaskScores:
        seen.append(plan)
        pipe.generate(["x"], steps=plan.steps["heun"][0], solver="heun", guidance_scale=plan.guidance_scale)
        return TaskScores([EvalRow("heun", s, 2 * s, {"score": s / 10}) for s in plan.steps["heun"]],
                          reference={"best_possible": 1.0}, note="made-up metric")

    register_task(Task("made-up", judge=judge))
    try:
        pipe = FakePipeline(digit_recipe("eval.task=made-up", "sampling.guidance_scale=3.5"),
                            lambda p, s: torch.zeros(1, 8, 8))
        report = evaluate(checkpoint, solvers=["heun", "euler"], nfe=[4, 9], samples_per_prompt=7, pipeline=pipe)
    finally:
        unregister_task("made-up")
    assert seen == [EvalPlan({"heun": [2, 4], "euler": [4, 9]}, 7, 3.5)]  # nfe budgets -> each solver's steps
    assert pipe.calls[0]["scale"] == 3.5 and report.guidance_scale == 3.5
    assert report.task == "made-up" and [r.metrics["score"] for r in report.scores.rows] == [0.2, 0.4]
    text = format_report(report)
    assert "task made-up: made-up metric, guidance 3.5; best possible: 1.000" in text
    assert "score" in text.splitlines()[2] and text.splitlines()[-1].split() == ["heun", "4", "8", "0.400"]


def test_generic_eval_calls_no_judge(checkpoint):
    pipe = FakePipeline(digit_recipe("eval.task=generic"), lambda p, s: torch.zeros(1, 8, 8))
    report = evaluate(checkpoint, pipeline=pipe)
    assert pipe.calls == [] and report.scores.rows == [] and report.bits_per_dim is None


def real_digit_drawer(follow_prompt: bool):
    """Draws a real digit of the prompt's class (or always a zero), as (1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    real = load_digits()
    label_of = {p: d for d in range(10) for p in captions_for(d) + heldout_prompts(d)}

    def draw(prompt: str, seed: int) -> torch.Tensor:
        label = label_of[prompt] if follow_prompt else 0
        pick = np.flatnonzero(real.target == label)[seed % 50]
        return torch.from_numpy(real.images[pick] / 16.0).float()[None]

    return draw


def test_digits_judge_scores_real_digits_as_correct_and_a_prompt_ignoring_model_as_chance(checkpoint):
    pipe = FakePipeline(digit_recipe(), real_digit_drawer(follow_prompt=True))
    scores = DIGITS.judge(pipe, EvalPlan({"euler": [4, 8]}, samples_per_prompt=5, guidance_scale=2.0))
    assert [(r.solver, r.steps, r.nfe) for r in scores.rows] == [("euler", 4, 8), ("euler", 8, 16)]
    assert all(r.metrics["accuracy"] == 1.0 and r.metrics["paraphrase_accuracy"] == 1.0 for r in scores.rows)
    assert all(0 <= r.metrics["frechet"] < 2 * scores.reference["frechet_floor"] for r in scores.rows)
    assert {c["n"] for c in pipe.calls} == {50} and {c["scale"] for c in pipe.calls} == {2.0}
    lazy = FakePipeline(digit_recipe(), real_digit_drawer(follow_prompt=False))
    row = DIGITS.judge(lazy, EvalPlan({"euler": [4]}, samples_per_prompt=5, guidance_scale=2.0)).rows[0]
    assert row.metrics["accuracy"] == row.metrics["paraphrase_accuracy"] == 0.1
    assert row.metrics["frechet"] > scores.rows[0].metrics["frechet"]
