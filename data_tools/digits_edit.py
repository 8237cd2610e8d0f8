"""`flowmatch-data digits-edit OUT`: the digits editing job's paired shards.

A sample pairs a reference digit d (`ref.png`, a real 8x8 digit from scikit-learn's set) and an instruction
"add K" (K a digit word, one to nine) with a target: another real digit, (d + K) mod 10, drawn at random from the
same split (scikit-learn's copy keeps no writer ids, so "another writer" means another sample). Every reference
image appears with every K; training also has K = 0 ("add zero", see TRAIN_ADDENDS), the held-out split only
1-9. Training instructions mix the canonical wording ("add three") with paraphrases ("plus three", "three more",
...); `HELDOUT_TEMPLATES` never occur in training, to check that the model follows unseen wordings. References
of the held-out split (`val-*.tar`) are the digits `data_tools.digits.is_val` holds out, so evaluation edits
images never trained on. Images are stored as `data_tools.digits.to_png` stores them.
`data_tools.digits_edit_task` makes this the `digits-edit` task (recipes/digits-edit.yaml).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.digits import DIGIT_WORDS, is_val, load_digits_arrays, to_png
from flowmatch.data.shardformat import TRAIN_PREFIX, VAL_PREFIX, ShardSink, reference_ext

ADDENDS = range(1, 10)
"""The addends evaluated: "add one" ... "add nine"."""
TRAIN_ADDENDS = range(0, 10)
"""The addends trained: also "add zero" (another real digit d), which ties the output to the reference's digit; for
K >= 1 neither the reference's digit nor the addend alone says anything about the target's digit."""
CANONICAL = "add {w}"
# Training paraphrases of "add K" ({w} the word, {n} the numeral); the canonical wording is drawn as often as all
# of them together, so that the eval's canonical prompts are the ones trained most.
PARAPHRASES = (
    "plus {w}",
    "{w} more",
    "increase by {w}",
    "add {n}",
    "count up {w}",
    "the digit plus {w}",
)
HELDOUT_TEMPLATES = (
    "{w} higher",
    "go up by {w}",
    "raise it by {w}",
)
# Training-only samples that give each input a signal of its own (for K >= 1 neither input alone says anything
# about the target's digit, and a model trained on "add K" alone stayed at chance): copies, whose digit is the
# reference's whatever the wording ("keep it" and the like; "add zero" is one), and absolute instructions, whose
# digit is the one named whatever the reference ("make it a three"). Never evaluated, never in the held-out split.
COPY_TEMPLATES = ("keep it", "the same digit", "leave it as it is")
ABSOLUTE_TEMPLATES = ("make it a {w}", "turn it into a {w}", "change it to {w}", "write a {n}")
COPIES_PER_REFERENCE = 4
"""Copy samples per training reference, beside its "add zero" (4 instead of 1: the output kept the reference's
class 0.35 of the time after 800 steps instead of 0.13 after 1,200)."""
ABSOLUTES_PER_REFERENCE = 3
"""Absolute samples per training reference, each naming a random digit."""
DEFAULT_SEED = 0
DEFAULT_SHARD_SIZE = 2048


def instruction(k: int, template: str = CANONICAL) -> str:
    """The instruction "add K" in `template` ({w} the word of K, {n} the numeral)."""
    return template.format(w=DIGIT_WORDS[k], n=k)


def edited(digit: int, k: int) -> int:
    """The digit the instruction asks for: (d + K) mod 10."""
    return (digit + k) % 10


def training_instruction(k: int, rng: random.Random) -> str:
    """The canonical wording half of the time, else one of the paraphrases."""
    return instruction(k, CANONICAL if rng.random() < 0.5 else rng.choice(PARAPHRASES))


@dataclass(frozen=True)
class Edit:
    """One paired sample: reference image `reference` (an index into the digits), addend `k`, instruction `text`,
    target image `target` (another digit, of label (d + K) mod 10), held out or not. A training-only absolute
    sample ("make it a three") has `k` None and a target of the digit it names."""

    reference: int
    k: Optional[int]
    text: str
    target: int
    val: bool


def edit_pairs(labels: np.ndarray, seed: int = DEFAULT_SEED) -> list[Edit]:
    """Every digit as the reference of every addend, shuffled, each with a target drawn from its own split and an
    instruction (canonical for held-out samples, canonical or paraphrased for training ones); training references
    also get COPIES_PER_REFERENCE copies and ABSOLUTES_PER_REFERENCE absolute samples."""
    rng = random.Random(seed)
    pools: dict[bool, list[list[int]]] = {val: [[] for _ in range(10)] for val in (False, True)}
    for index, label in enumerate(labels):
        pools[is_val(index)][int(label)].append(index)
    # (reference, addend or None, template or None: the canonical-or-paraphrase draw of an "add K")
    jobs: list[tuple[int, Optional[int], Optional[str]]] = []
    for index in range(len(labels)):
        if is_val(index):
            jobs += [(index, k, CANONICAL) for k in ADDENDS]
            continue
        jobs += [(index, k, None) for k in TRAIN_ADDENDS]
        jobs += [(index, 0, rng.choice(COPY_TEMPLATES)) for _ in range(COPIES_PER_REFERENCE)]
        jobs += [(index, None, rng.choice(ABSOLUTE_TEMPLATES)) for _ in range(ABSOLUTES_PER_REFERENCE)]
    rng.shuffle(jobs)  # shards should each be a fair mix of digits, addends and kinds
    edits = []
    for index, k, template in jobs:
        if k is None:  # absolute: a random digit, named
            digit = rng.randrange(10)
            text = instruction(digit, template)
        else:
            digit = edited(int(labels[index]), k)
            text = training_instruction(k, rng) if template is None else instruction(k, template)
        target = rng.choice([i for i in pools[is_val(index)][digit] if i != index])
        edits.append(Edit(index, k, text, target, is_val(index)))
    return edits


def write_digits_edit(out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = DEFAULT_SEED,
                      overwrite: bool = False) -> dict[str, int]:
    """Write train-*.tar and val-*.tar into `out`; returns {"train": n, "val": m} (samples)."""
    images, labels = load_digits_arrays()
    counts = {"train": 0, "val": 0}
    pngs = [to_png(image) for image in images]
    with ShardSink(out, prefix=TRAIN_PREFIX, shard_size=shard_size, overwrite=overwrite) as train, \
            ShardSink(out, prefix=VAL_PREFIX, shard_size=shard_size, overwrite=overwrite) as val:
        for n, e in enumerate(edit_pairs(labels, seed)):
            meta = {"label": int(labels[e.target]), "reference_label": int(labels[e.reference]), "add": e.k,
                    "reference": e.reference, "index": e.target, "caption": e.text}
            sink = val if e.val else train
            files = {"png": pngs[e.target], reference_ext(0, "png"): pngs[e.reference], "txt": e.text,
                     "json": json.dumps(meta)}
            sink.write(f"edit-{n:06d}-{e.reference:04d}", files)  # several samples share a reference
            counts["val" if e.val else "train"] += 1
    return counts


def heldout_references() -> tuple[np.ndarray, np.ndarray]:
    """The held-out split's reference digits: (images (N, 8, 8) on 0..16, labels (N,))."""
    images, labels = load_digits_arrays()
    keep = np.array([is_val(i) for i in range(len(images))])
    return images[keep], labels[keep]
