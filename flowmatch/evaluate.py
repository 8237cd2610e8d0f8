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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from flowmatch.sampling.diffusion import check_sampler
from flowmatch.tasks import check_task_name, get_task

if TYPE_CHECKING:
    from flowmatch.sampling import Pipeline

GENERIC = "generic"


@dataclass
class EvalConfig:
    """The recipe's `eval` section: what `flowmatch eval` measures."""

    task: str = GENERIC
    """A task (flowmatch.tasks) whose judge scores generated images, e.g. digits; generic = bits/dim only."""
    steps: list[int] = field(default_factory=lambda: [4, 8, 20, 50])
    """Step counts to evaluate."""
    solvers: list[str] = field(default_factory=lambda: ["euler"])
    """Solvers to evaluate."""
    samples_per_prompt: int = 50
    """Generated images per prompt of the task's judge."""
    likelihood_samples: int = 16
    """Held-out images whose bits per dimension are measured (0 = skip)."""
    likelihood_rtol: float = 1e-3
    """Relative tolerance of the likelihood ODE solve (dopri5); 1e-4 moved the digits bits/dim by under 0.01."""
    likelihood_atol: float = 1e-4
    """Absolute tolerance of the likelihood ODE solve."""

    def __post_init__(self) -> None:
        check_task_name(self.task, "eval.task", also=(GENERIC,))
        for solver in self.solvers:
            check_sampler(solver, "eval.solvers")
        if not self.steps or min(self.steps) < 1 or self.samples_per_prompt < 1 or self.likelihood_samples < 0:
            raise ValueError("steps must be >= 1, samples_per_prompt >= 1 and likelihood_samples >= 0")


@dataclass
class EvalPlan:
    """What a task's judge is asked to measure."""

    steps: dict[str, list[int]]
    """Solver -> step counts, one report row each (from eval.steps, or the steps that fit each --nfe budget)."""
    samples_per_prompt: int
    """Images to generate per prompt."""
    guidance_scale: float
    """Classifier-free guidance scale to generate with."""


@dataclass
class EvalRow:
    """One solver at one step count: the velocity evaluations it took and the task's metrics."""

    solver: str
    steps: int
    nfe: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskScores:
    """What a task's judge returns."""

    rows: list[EvalRow] = field(default_factory=list)
    reference: dict[str, float] = field(default_factory=dict)
    """Values to read the rows against, e.g. the Frechet distance of real data to itself at the same sample size."""
    note: str = ""
    """One line for the printed report (what was generated and how it was judged)."""


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
    pipeline: Optional["Pipeline"] = None,
) -> EvalReport:
    """Evaluate a run or checkpoint directory; None arguments take the recipe's `eval` section.

    `nfe` (velocity evaluations) replaces `steps`: each solver gets the most steps that fit the budget, so
    solvers are compared at equal cost.
    """
    from flowmatch.checkpoint import resolve_checkpoint
    from flowmatch.pipeline import load_pipeline

    ckpt = resolve_checkpoint(path)
    pipe = pipeline or load_pipeline(ckpt)
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
    from flowmatch.sampling import steps_for_nfe

    return {s: [steps_for_nfe(s, budget) for budget in nfe] if nfe else list(steps) for s in solvers}


def heldout_bits_per_dim(pipe: "Pipeline", count: int) -> Optional[float]:
    """Bits per dimension of up to `count` held-out images under the conditional model (guidance off).

    Pixel space: the 8-bit images are dequantised with uniform noise and the density is reported per 8-bit
    pixel value (the usual bits/dim of image likelihood papers). Latent space: bits per latent dimension of the
    continuous latent density (not comparable with pixel bits/dim). On a variance-preserving path the solve starts
    at t = 1e-3 (``Formulation.likelihood_start``): the density of the data's t = 1e-3 marginal at the data.
    """
    from flowmatch.data import build_loader, has_val_split
    from flowmatch.sampling import PIXEL_DATA_SCALE_CORRECTION, bits_per_dim, dequantize_pixels, log_likelihood

    if not has_val_split(pipe.recipe.data):
        return None
    loader = build_loader(pipe.recipe.data, rank=0, world_size=1, batch_size=count, seed=0, split="val",
                          max_batches=1, encoders=pipe.encoders.fingerprints())
    x0, cond = pipe.encoders.encode_batch(next(iter(loader)))
    if pipe.recipe.model.guidance_embed:  # a model that takes the guidance scale: 1 is guidance off
        from flowmatch.flow import with_guidance

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
