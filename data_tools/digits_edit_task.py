"""The `digits-edit` task: the digits editing job as a flowmatch task plug-in (registered in pyproject.toml).

Builder: `data_tools.digits_edit.write_digits_edit` (data.prepare: digits-edit). Judge (eval.task: digits-edit):
edit accuracy on held-out reference digits d, the digits classifier's digit of each output (the SVC of the digits
task, fit on the 1,797 real digits) against (d + K) mod 10, for the canonical instruction ("add three") at every
solver and step count asked for, and for the trained paraphrases and the held-out wordings once per solver at the
recipe's sampling steps (wording accuracy measures conditioning, not the solver). Beside them: the copy
baseline, the accuracy of outputting the reference itself. Prompts: the canonical instruction of each addend,
the rows of the validation grid in recipes/digits-edit.yaml (each beside a held-out reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from data_tools.digits import load_digits_arrays, to_png
from data_tools.digits_edit import (
    ADDENDS,
    CANONICAL,
    HELDOUT_TEMPLATES,
    PARAPHRASES,
    edited,
    heldout_references,
    instruction,
    write_digits_edit,
)
from data_tools.digits_task import SVC_GAMMA, to_digit_features
from flowmatch.data.decode import decode_pixels
from flowmatch.evaluate import EvalPlan, EvalRow, TaskScores
from flowmatch.tasks import Task

if TYPE_CHECKING:
    from flowmatch.pipeline import Pipeline

# Seeds of the generated images: canonical wordings from 0, trained paraphrases and held-out wordings from these.
PARAPHRASE_SEED = 10_000
HELDOUT_SEED = 20_000


def reference_pixels(pipe: "Pipeline", digits: np.ndarray) -> torch.Tensor:
    """Real digits (N, 8, 8) on 0..16 as training sees them (PNG, resized to the recipe's resolution):
    (N, C, H, W) in [0, 1], the reference images `Pipeline.generate(images=...)` takes."""
    data = pipe.recipe.data
    height, width = data.size
    pixels = [decode_pixels(to_png(d), height=height, width=width, channels=data.channels,
                            max_pixels=data.max_image_pixels) for d in digits]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


def edit_cases(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` held-out references per addend: (reference indices into heldout_references(), addends K, wanted
    digits (d + K) mod 10); each addend starts at another place in the held-out list, so every digit meets every K."""
    _, labels = heldout_references()
    index = np.array([(i + 7 * k) % len(labels) for k in ADDENDS for i in range(count)])
    addends = np.repeat(np.array(list(ADDENDS)), count)
    return index, addends, np.array([edited(int(labels[i]), int(k)) for i, k in zip(index, addends)])


def judge(pipe: "Pipeline", plan: EvalPlan) -> TaskScores:
    """Edit accuracy per solver and step count, wording accuracies and the copy baseline (see the module
    docstring)."""
    from sklearn.svm import SVC  # reason: scikit-learn is the demo's optional dependency

    images, labels = load_digits_arrays()
    classifier = SVC(gamma=SVC_GAMMA).fit(images.reshape(len(images), -1), labels)
    references, _ = heldout_references()
    index, addends, wanted = edit_cases(plan.samples_per_prompt)
    refs = reference_pixels(pipe, references[index])

    def accuracy(outputs: torch.Tensor) -> float:
        return float((classifier.predict(to_digit_features(outputs)) == wanted).mean())

    def prompts(templates: tuple[str, ...]) -> list[str]:  # cycle the wordings over the cases
        return [instruction(int(k), templates[i % len(templates)]) for i, k in enumerate(addends)]

    scores = TaskScores(
        reference={"copy_baseline": accuracy(refs)},
        note=f"{plan.samples_per_prompt} held-out references per addend (1-9), judged by an SVC fit on the real "
             "digits against (d + K) mod 10",
    )
    sampling = pipe.recipe.sampling
    for solver, step_counts in plan.steps.items():
        wordings = {}
        for name, templates, seed in (("paraphrase_accuracy", PARAPHRASES, PARAPHRASE_SEED),
                                      ("heldout_wording_accuracy", HELDOUT_TEMPLATES, HELDOUT_SEED)):
            wordings[name] = accuracy(pipe.generate(prompts(templates), images=refs, steps=sampling.steps,
                                                    solver=solver, seed=seed, guidance_scale=plan.guidance_scale))
        for steps in step_counts:
            outputs = pipe.generate(prompts((CANONICAL,)), images=refs, steps=steps, solver=solver, seed=0,
                                    guidance_scale=plan.guidance_scale)
            scores.rows.append(EvalRow(solver, steps, pipe.last_nfe, {"edit_accuracy": accuracy(outputs),
                                                                      **wordings}))
    return scores


TASK = Task(
    name="digits-edit",
    description="edit a real 8x8 digit d by an instruction 'add K' into another real digit (d + K) mod 10 (CPU demo)",
    build=write_digits_edit,
    judge=judge,
    prompts=tuple(instruction(k) for k in ADDENDS),
)
