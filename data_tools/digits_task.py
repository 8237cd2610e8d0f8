"""The `digits` task: scikit-learn's 8x8 digits as a flowmatch task plug-in (registered in pyproject.toml).

Builder: `data_tools.digits.write_digits` (data.prepare: digits). Autoencoder (autoencoder.prepare: digits): a
small AutoencoderKL trained on the digits at the recipe's resolution (`build_autoencoder`). Judge (eval.task:
digits): prompt accuracy, an SVC fit on the 1,797 real digits classifying each generated image after average
pooling to 8x8, for the training caption wording and for paraphrases never used in training; and the Frechet
distance between generated and real digits (pixel features) beside the real-vs-real floor at the same sample
size, and for latent models beside the autoencoder's own floor (real digits through encode and decode). Prompts:
one training wording per digit, the rows of the validation grid in recipes/digits.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_tools.digits import MAX_VALUE, SIDE, captions_for, heldout_prompts, to_png, write_digits
from flowmatch.evaluate import EvalPlan, EvalRow, TaskScores, frechet_distance
from flowmatch.tasks import Task

if TYPE_CHECKING:
    from flowmatch.data.config import DataConfig
    from flowmatch.pipeline import Pipeline

DIGITS = range(10)
# SVC hyper-parameters for the 8x8 digits (scikit-learn's digits classification example uses gamma=0.001);
# fit on all 1,797 real digits it is an independent judge of generated ones.
SVC_GAMMA = 0.001
# Seeds of the generated images: training wordings from 0, paraphrases from here (image i uses seed + i).
PARAPHRASE_SEED = 10_000


# The digits autoencoder (autoencoder.prepare: digits), sized for a 2-core CPU: at 32x32, 400 steps of batch 64
# gave 29.13 dB held-out PSNR (300 steps: 28.22 dB); width 16 took twice the time per step of width 8 (measured
# with one thread on a loaded machine).
AUTOENCODER_STEPS = 400
AUTOENCODER_WIDTH = 8


def build_autoencoder(data: "DataConfig", out: Path) -> None:
    """Train the digits autoencoder on data.shards at data.resolution and data.channels into `out`."""
    from data_tools.autoencoder import AutoencoderSettings, train_autoencoder

    height, width = data.size
    settings = AutoencoderSettings(resolution=(height, width), channels=data.channels, width=AUTOENCODER_WIDTH,
                                   steps=AUTOENCODER_STEPS)
    print(train_autoencoder(data.shards, out, settings).summary(), flush=True)


def digit_prompts() -> list[str]:
    """One training-wording prompt per digit ("a handwritten digit zero", ...)."""
    return [captions_for(d)[0] for d in DIGITS]


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> (B, 64) on the real digits' 0..16 scale, after channel mean and 8x8 average pooling."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), SIDE)
    return (pooled.flatten(1) * MAX_VALUE).cpu().numpy()


def reconstructions(pipe: "Pipeline", digits: np.ndarray) -> torch.Tensor:
    """Real digits (N, 8, 8) on 0..16 as training sees them (PNG, resized to the recipe's resolution), through the
    autoencoder's encode and decode: (N, C, H, W) in [0, 1]."""
    from flowmatch.data.decode import decode_pixels

    data = pipe.recipe.data
    height, width = data.size
    pixels = [decode_pixels(to_png(d), height=height, width=width, channels=data.channels,
                            max_pixels=data.max_image_pixels) for d in digits]
    return pipe.reconstruct(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)).cpu()


def judge(pipe: "Pipeline", plan: EvalPlan) -> TaskScores:
    """Accuracy, paraphrase accuracy and Frechet distance per solver and step count (see the module docstring).

    Paraphrase accuracy measures conditioning, not the solver: it is measured once per solver, at the recipe's
    sampling steps, and repeated on that solver's rows.
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    real = load_digits()
    classifier = SVC(gamma=SVC_GAMMA).fit(real.data, real.target)
    labels = np.repeat(np.arange(len(DIGITS)), plan.samples_per_prompt)
    rng = np.random.default_rng(0)
    size = min(len(labels), len(real.data) // 2)
    order = rng.permutation(len(real.data))
    scores = TaskScores(  # the floor: real digits against other real digits, at the same sample size
        reference={"frechet_floor": frechet_distance(real.data[order[:size]], real.data[order[size:2 * size]])},
        note=f"{plan.samples_per_prompt} images per digit, judged by an SVC fit on the real digits",
    )
    if pipe.recipe.autoencoder.kind != "identity":  # the autoencoder's floor: the real digits, encoded and decoded
        rebuilt = to_digit_features(reconstructions(pipe, real.images[order[size:2 * size]]))
        scores.reference["frechet_reconstruction"] = frechet_distance(real.data[order[:size]], rebuilt)
    train_prompts = [digit_prompts()[d] for d in labels]
    paraphrases = [heldout_prompts(d) for d in DIGITS]
    para_prompts = [paraphrases[d][i % len(paraphrases[d])] for i, d in enumerate(labels)]  # cycle the wordings
    for solver, step_counts in plan.steps.items():
        para_images = pipe.generate(para_prompts, solver=solver, seed=PARAPHRASE_SEED,
                                    guidance_scale=plan.guidance_scale)
        paraphrase_accuracy = float((classifier.predict(to_digit_features(para_images)) == labels).mean())
        for steps in step_counts:
            images = pipe.generate(train_prompts, steps=steps, solver=solver, seed=0,
                                   guidance_scale=plan.guidance_scale)
            nfe = pipe.last_nfe
            feats = to_digit_features(images)
            sub = feats[rng.permutation(len(feats))[:size]]
            scores.rows.append(EvalRow(solver, steps, nfe, {
                "accuracy": float((classifier.predict(feats) == labels).mean()),
                "paraphrase_accuracy": paraphrase_accuracy,
                "frechet": frechet_distance(sub, real.data[order[:size]]),
            }))
    return scores


TASK = Task(
    name="digits",
    description="scikit-learn's 1,797 8x8 handwritten digits with varied captions (CPU demo)",
    build=write_digits,
    autoencoder=build_autoencoder,
    judge=judge,
    prompts=tuple(digit_prompts()),
)
