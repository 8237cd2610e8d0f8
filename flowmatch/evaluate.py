"""`flowmatch eval`: how good a trained run is.

digits task: prompt accuracy (an SVC fit on scikit-learn's real 8x8 digits classifies each generated image,
average-pooled to 8x8) for the training caption wording and for paraphrases never used in training, and the
Frechet distance between generated and real digits (pixel features) beside the real-vs-real floor at the same
sample size; both for several solvers and step counts. Every task: bits per dimension of held-out images
under the model's ODE (exact likelihood, flowmatch.sampling.log_likelihood).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flowmatch.encoders.conditioning import Conditioning
from flowmatch.pipeline import Pipeline, encode_batch, encoder_fingerprints

# SVC hyper-parameters for the 8x8 digits (scikit-learn's digits classification example uses gamma=0.001);
# fit on all 1,797 real digits it is an independent judge of generated ones.
SVC_GAMMA = 0.001
DIGIT_LEVELS = 16.0  # scikit-learn's digits are integers 0..16


@dataclass
class EvalRow:
    """One solver at one step count."""

    solver: str
    steps: int
    nfe: int
    accuracy: float
    paraphrase_accuracy: float
    frechet: float


@dataclass
class EvalReport:
    """Everything `flowmatch eval` measured."""

    checkpoint: str
    guidance_scale: float = float("nan")
    rows: list[EvalRow] = field(default_factory=list)
    frechet_floor: float = float("nan")
    bits_per_dim: Optional[float] = None
    samples_per_prompt: int = 0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fit to feature rows a (N, D) and b (M, D).

    tr sqrt(Ca Cb) is computed as the trace of sqrt(Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix, by eigenvalues:
    exact for the singular covariances of digit pixels that are always blank, where a general matrix square root
    is unstable.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [0, 1] -> (B, 64) on the real digits' 0..16 scale, after average pooling to 8x8."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8)
    return (pooled.flatten(1) * DIGIT_LEVELS).cpu().numpy()


def digit_prompts() -> tuple[list[str], list[list[str]]]:
    """(training-wording prompt per digit, paraphrase prompts per digit never used in training captions)."""
    from data_tools.digits import captions_for, heldout_prompts

    return [captions_for(d)[0] for d in range(10)], [heldout_prompts(d) for d in range(10)]


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
) -> EvalReport:
    """Evaluate a run or checkpoint directory; None arguments take the recipe's `eval` section.

    `nfe` (velocity evaluations) replaces `steps`: each solver gets the most steps that fit the budget, so
    solvers are compared at equal cost.
    """
    from flowmatch.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    pipe = pipeline or Pipeline.from_checkpoint(ckpt)
    cfg = pipe.recipe.eval
    steps = steps or cfg.steps
    solvers = solvers or cfg.solvers
    n = samples_per_prompt or cfg.samples_per_prompt
    scale = pipe.recipe.sampling.guidance_scale if guidance_scale is None else guidance_scale
    report = EvalReport(str(ckpt), guidance_scale=scale, samples_per_prompt=n)
    if cfg.task == "digits":
        digits_quality(pipe, report, steps, solvers, n, nfe=nfe, guidance_scale=guidance_scale)
    n_lik = cfg.likelihood_samples if likelihood_samples is None else likelihood_samples
    if n_lik:
        report.bits_per_dim = heldout_bits_per_dim(pipe, n_lik)
    if out:
        Path(out).write_text(json.dumps(asdict(report), indent=2))
    return report


def digits_quality(pipe: Pipeline, report: EvalReport, steps: list[int], solvers: list[str], n: int,
                   nfe: Optional[list[int]] = None, guidance_scale: Optional[float] = None) -> None:
    """Fill report.rows and the Frechet floor for the digits task.

    Paraphrase accuracy measures conditioning, not the solver: it is measured once per solver, at the recipe's
    sampling steps, and repeated on that solver's rows.
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from flowmatch.sampling import steps_for_nfe

    real = load_digits()
    classifier = SVC(gamma=SVC_GAMMA).fit(real.data, real.target)
    train_prompts, paraphrases = digit_prompts()
    labels = np.repeat(np.arange(10), n)
    rng = np.random.default_rng(0)
    size = min(10 * n, len(real.data) // 2)
    order = rng.permutation(len(real.data))
    report.frechet_floor = frechet_distance(real.data[order[:size]], real.data[order[size:2 * size]])
    for solver in solvers:
        # Paraphrases: cycle through each digit's held-out wordings.
        para = [paraphrases[d][i % len(paraphrases[d])] for i, d in enumerate(labels)]
        para_images = pipe.generate(para, solver=solver, seed=10_000, guidance_scale=guidance_scale)
        paraphrase_accuracy = float((classifier.predict(to_digit_features(para_images)) == labels).mean())
        for k in ([steps_for_nfe(solver, budget) for budget in nfe] if nfe else steps):
            prompts = [train_prompts[d] for d in labels]
            images = pipe.generate(prompts, steps=k, solver=solver, seed=0, guidance_scale=guidance_scale)
            nfe_used = pipe.last_nfe
            feats = to_digit_features(images)
            accuracy = float((classifier.predict(feats) == labels).mean())
            sub = feats[rng.permutation(len(feats))[:size]]
            report.rows.append(EvalRow(solver, k, nfe_used, accuracy, paraphrase_accuracy,
                                       frechet_distance(sub, real.data[order[:size]])))


def heldout_bits_per_dim(pipe: Pipeline, count: int) -> Optional[float]:
    """Bits per dimension of up to `count` held-out images under the conditional model (guidance off).

    Pixel space: the 8-bit images are dequantised with uniform noise and the density is reported per 8-bit
    pixel value (the usual bits/dim of image likelihood papers). Latent space: bits per latent dimension of the
    continuous latent density (not comparable with pixel bits/dim).
    """
    from flowmatch.data import build_loader, has_val_split
    from flowmatch.sampling import PIXEL_DATA_SCALE_CORRECTION, bits_per_dim, dequantize_pixels, log_likelihood

    if not has_val_split(pipe.recipe.data):
        return None
    loader = build_loader(pipe.recipe.data, rank=0, world_size=1, batch_size=count, seed=0, split="val",
                          max_batches=1, encoders=encoder_fingerprints(pipe.text_encoder, pipe.autoencoder))
    x0, text = encode_batch(next(iter(loader)), pipe.text_encoder, pipe.autoencoder, pipe.device)
    pixel_space = pipe.autoencoder.vae is None
    if pixel_space:  # pixels k / 127.5 - 1, cached or not: spread each 8-bit level over its bin
        x0 = dequantize_pixels(x0, generator=torch.Generator().manual_seed(0))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pipe.model(x, t, Conditioning(text.hidden, text.mask, text.pooled))

    cfg = pipe.recipe.eval
    # Exact divergence costs one backward per dimension: fine for pixels and small latents, Hutchinson beyond.
    logp = log_likelihood(velocity, x0, exact_divergence=x0[0].numel() <= 256, rtol=cfg.likelihood_rtol,
                          atol=cfg.likelihood_atol, generator=torch.Generator().manual_seed(0))
    correction = PIXEL_DATA_SCALE_CORRECTION if pixel_space else 0.0
    return float(bits_per_dim(logp, x0[0].numel(), data_scale_correction=correction).mean())


def format_report(report: EvalReport) -> str:
    """A plain-text table."""
    lines = [f"checkpoint: {report.checkpoint}"]
    if report.rows:
        lines.append(f"{report.samples_per_prompt} images per digit, guidance {report.guidance_scale:g}; Frechet "
                     f"distance floor (real vs real, same sample size): {report.frechet_floor:.3f}")
        lines.append(f"{'solver':>8} {'steps':>5} {'nfe':>4} {'accuracy':>9} {'paraphrase':>10} {'frechet':>8}")
        for r in report.rows:
            lines.append(f"{r.solver:>8} {r.steps:>5} {r.nfe:>4} {r.accuracy:>9.3f} "
                         f"{r.paraphrase_accuracy:>10.3f} {r.frechet:>8.3f}")
    if report.bits_per_dim is not None and math.isfinite(report.bits_per_dim):
        lines.append(f"held-out bits per dimension: {report.bits_per_dim:.3f}")
    return "\n".join(lines)
