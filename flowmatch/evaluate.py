"""`flowmatch eval`: how good a trained run is.

For every recipe: bits per dimension of held-out images under the model's ODE (exact likelihood,
flowmatch.sampling.log_likelihood). When the recipe's `eval.task` names a task (flowmatch.tasks), that task's
judge also scores generated images for every solver and step count asked for (the digits task: prompt accuracy
of an independent classifier and the Frechet distance to real digits). Generic metrics live here; what a task
measures lives with the task.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flowmatch.data import build_loader, has_val_split
from flowmatch.eval_config import GENERIC, EvalConfig
from flowmatch.flow import with_guidance
from flowmatch.pipeline import Pipeline, load_pipeline
from flowmatch.run import read_meta, resolve_checkpoint
from flowmatch.sampling import (
    PIXEL_DATA_SCALE_CORRECTION,
    bits_per_dim,
    dequantize_pixels,
    log_likelihood,
    steps_for_nfe,
)
from flowmatch.tasks import EvalPlan, EvalRow, TaskScores, get_task
from flowmatch.training.validation import fixed_time_loss, heldout_batch

__all__ = ["EmaScore", "EvalConfig", "EvalPlan", "EvalReport", "EvalRow", "GENERIC", "TaskScores", "compare_emas",
           "evaluate", "format_report", "frechet_distance", "heldout_bits_per_dim", "plan_steps"]

@dataclass
class EvalReport:
    """Everything `flowmatch eval` measured."""

    checkpoint: str
    task: str = GENERIC
    guidance_scale: float = float("nan")
    samples_per_prompt: int = 0
    scores: TaskScores = field(default_factory=TaskScores)
    bits_per_dim: Optional[float] = None


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fit to feature rows a (N, D) and b (M, D).

    tr sqrt(Ca Cb) is computed as the trace of sqrt(Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix, by eigenvalues:
    exact for singular covariances (features that are constant, such as always-blank pixels), where a general
    matrix square root is unstable.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def evaluate(
    path: str | Path,
    *,
    steps: Optional[list[int]] = None,
    solvers: Optional[list[str]] = None,
    nfe: Optional[list[int]] = None,
    guidance_scale: Optional[float] = None,
    samples_per_prompt: Optional[int] = None,
    likelihood_samples: Optional[int] = None,
    out: Optional[str | Path] = None,
    pipeline: Optional[Pipeline] = None,
    relocate: Optional[Mapping[str, str]] = None,
) -> EvalReport:
    """Evaluate a run or checkpoint directory; None arguments take the recipe's `eval` section.

    `nfe` (velocity evaluations) replaces `steps`: each solver gets the most steps that fit the budget, so
    solvers are compared at equal cost. `relocate` (recipe path key -> path) points the run at assets moved since
    it recorded them (:mod:`flowmatch.run.paths`).
    """
    ckpt = resolve_checkpoint(path)
    pipe = pipeline or load_pipeline(ckpt, relocate=relocate)
    cfg = pipe.recipe.eval
    n = samples_per_prompt or cfg.samples_per_prompt
    scale = pipe.recipe.sampling.guidance_scale if guidance_scale is None else guidance_scale
    report = EvalReport(str(ckpt), task=cfg.task, guidance_scale=scale, samples_per_prompt=n)
    if cfg.task != GENERIC:
        judge = get_task(cfg.task, "eval.task").judge
        if judge is None:
            raise ValueError(f"eval.task={cfg.task!r}: that task has no judge; use eval.task={GENERIC!r}")
        report.scores = judge(pipe, EvalPlan(plan_steps(solvers or cfg.solvers, steps or cfg.steps, nfe), n, scale))
    n_lik = cfg.likelihood_samples if likelihood_samples is None else likelihood_samples
    if n_lik:
        report.bits_per_dim = heldout_bits_per_dim(pipe, n_lik)
    if out:
        Path(out).write_text(json.dumps(asdict(report), indent=2))
    return report


def plan_steps(solvers: list[str], steps: list[int], nfe: Optional[list[int]]) -> dict[str, list[int]]:
    """Solver -> step counts: `steps` for every solver, or per solver the most steps within each `nfe` budget."""
    return {s: [steps_for_nfe(s, budget) for budget in nfe] if nfe else list(steps) for s in solvers}


def heldout_bits_per_dim(pipe: Pipeline, count: int) -> Optional[float]:
    """Bits per dimension of up to `count` held-out images under the conditional model (guidance off).

    Pixel space: the 8-bit images are dequantised with uniform noise and the density is reported per 8-bit
    pixel value (the usual bits/dim of image likelihood papers). Latent space: bits per latent dimension of the
    continuous latent density (not comparable with pixel bits/dim). On a variance-preserving path the solve starts
    at t = 1e-3 (``Formulation.likelihood_start``): the density of the data's t = 1e-3 marginal at the data.
    """
    if not has_val_split(pipe.recipe.data):
        return None
    loader = build_loader(pipe.recipe.data, rank=0, world_size=1, batch_size=count, seed=0, split="val",
                          max_batches=1, encoders=pipe.encoders.fingerprints())
    x0, cond = pipe.encoders.encode_batch(next(iter(loader)))
    if pipe.recipe.model.guidance_embed:  # a model that takes the guidance scale: 1 is guidance off
        cond = with_guidance(cond, 1.0)
    pixel_space = pipe.encoders.pixel_space
    if pixel_space:  # pixels k / 127.5 - 1, cached or not: spread each 8-bit level over its bin
        x0 = dequantize_pixels(x0, generator=torch.Generator().manual_seed(0))

    model_velocity = pipe.formulation.to_velocity(pipe.model)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_velocity(x, t, cond)

    cfg = pipe.recipe.eval
    # Exact divergence costs one backward per dimension: fine for pixels and small latents, Hutchinson beyond.
    logp = log_likelihood(velocity, x0, exact_divergence=x0[0].numel() <= 256, rtol=cfg.likelihood_rtol,
                          atol=cfg.likelihood_atol, generator=torch.Generator().manual_seed(0),
                          t_start=pipe.formulation.likelihood_start)
    correction = PIXEL_DATA_SCALE_CORRECTION if pixel_space else 0.0
    return float(bits_per_dim(logp, x0[0].numel(), data_scale_correction=correction).mean())


def format_report(report: EvalReport) -> str:
    """A plain-text table: one row per solver and step count, one column per metric of the task."""
    lines = [f"checkpoint: {report.checkpoint}"]
    scores = report.scores
    if scores.rows:
        reference = "".join(f"; {name.replace('_', ' ')}: {value:.3f}" for name, value in scores.reference.items())
        lines.append(f"task {report.task}: {scores.note or f'{report.samples_per_prompt} images per prompt'}, "
                     f"guidance {report.guidance_scale:g}{reference}")
        names = list(dict.fromkeys(name for row in scores.rows for name in row.metrics))
        widths = [max(9, len(name)) for name in names]
        lines.append(f"{'solver':>8} {'steps':>5} {'nfe':>4} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
        for r in scores.rows:
            values = " ".join(f"{r.metrics.get(n, float('nan')):>{w}.3f}" for n, w in zip(names, widths))
            lines.append(f"{r.solver:>8} {r.steps:>5} {r.nfe:>4} {values}")
    if report.bits_per_dim is not None and math.isfinite(report.bits_per_dim):
        lines.append(f"held-out bits per dimension: {report.bits_per_dim:.3f}")
    return "\n".join(lines)


@dataclass
class EmaScore:
    """How one set of weights of a run does: the validation loss, and the task's metrics when it has a judge."""

    weights: str
    """``raw``, ``ema`` (the training EMA) or a reconstructed EMA's name."""
    val_loss: float | None
    """Held-out loss at the validation timesteps (None without a held-out split)."""
    metrics: dict[str, float]
    """The task judge's metrics at the recipe's sampling steps and solver (empty for the generic task)."""


def compare_emas(ckpt_dir: str | os.PathLike[str], names: list[str], *,
                 samples_per_prompt: int | None = None,
                 relocate: Optional[Mapping[str, str]] = None) -> list[EmaScore]:
    """Score the raw weights, the training EMA (when the checkpoint has one) and the reconstructed EMAs ``names``
    of a checkpoint with the validation metric of training (:func:`~flowmatch.training.validation.fixed_time_loss`,
    one held-out batch of ``train.batch_size``) and, for a task with a judge, with `flowmatch eval`'s metrics
    (`flowmatch ema --eval`)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    candidates: list[tuple[str, bool | str]] = [("raw", False)]
    if read_meta(ckpt).ema:
        candidates.append(("ema", True))
    candidates += [(name, name) for name in names]
    scores, batch = [], None
    for label, choice in candidates:
        pipe = load_pipeline(ckpt, ema=choice, relocate=relocate)
        recipe = pipe.recipe
        val_loss = None
        if has_val_split(recipe.data):
            batch = batch or heldout_batch(recipe.data, pipe.encoders, recipe.train.batch_size)
            val_loss = float(fixed_time_loss(pipe.model, *batch, formulation=pipe.formulation))
        metrics: dict[str, float] = {}
        if recipe.eval.task != GENERIC:
            report = evaluate(ckpt, pipeline=pipe, steps=[recipe.sampling.steps], solvers=[recipe.sampling.solver],
                              samples_per_prompt=samples_per_prompt, likelihood_samples=0)
            metrics = report.scores.rows[0].metrics
        scores.append(EmaScore(label, val_loss, metrics))
    return scores
