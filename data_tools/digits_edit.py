"""`flowmatch-data digits-edit OUT`: the digits editing job's paired shards.

A sample pairs a reference digit d (`ref.png`, a real 8x8 digit from scikit-learn's set) and an instruction
"add K" (K a digit word, one to nine) with a target: another real digit, (d + K) mod 10, drawn at random from the
same split (scikit-learn's copy keeps no writer ids, so "another writer" means another sample). Every reference
image appears with every K. Training instructions mix the canonical wording ("add three") with paraphrases
("plus three", "three more", ...); `HELDOUT_TEMPLATES` never occur in training, to check that the model follows
unseen wordings. References of the held-out split (`val-*.tar`) are the digits `data_tools.digits.is_val` holds out,
so evaluation edits images never trained on. Images are stored as `data_tools.digits.to_png` stores them.
`data_tools.digits_edit_task` makes this the `digits-edit` task (recipes/digits-edit.yaml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from data_tools.digits import DIGIT_WORDS, is_val, load_digits_arrays, to_png
from flowmatch.data.shardformat import TRAIN_PREFIX, VAL_PREFIX, ShardSink, reference_ext

ADDENDS = range(1, 10)
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


def write_digits_edit(out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = DEFAULT_SEED,
                      overwrite: bool = False) -> dict[str, int]:
    """Write train-*.tar and val-*.tar into `out`; returns {"train": n, "val": m} (samples)."""
    images, labels = load_digits_arrays()
    rng = random.Random(seed)
    pools: dict[str, list[list[int]]] = {split: [[] for _ in range(10)] for split in ("train", "val")}
    for index, label in enumerate(labels):
        pools["val" if is_val(index) else "train"][int(label)].append(index)
    pairs = [(index, k) for index in range(len(images)) for k in ADDENDS]
    rng.shuffle(pairs)  # shards should each be a fair mix of digits and addends
    counts = {"train": 0, "val": 0}
    pngs = [to_png(image) for image in images]
    with ShardSink(out, prefix=TRAIN_PREFIX, shard_size=shard_size, overwrite=overwrite) as train, \
            ShardSink(out, prefix=VAL_PREFIX, shard_size=shard_size, overwrite=overwrite) as val:
        for index, k in pairs:
            split = "val" if is_val(index) else "train"
            digit = int(labels[index])
            want = edited(digit, k)
            target = rng.choice(pools[split][want])
            text = instruction(k) if split == "val" else training_instruction(k, rng)
            meta = {"label": want, "reference_label": digit, "add": k, "reference": index, "index": target,
                    "caption": text}
            sink = val if split == "val" else train
            sink.write(f"edit-{index:04d}-{k}", {"png": pngs[target], reference_ext(0, "png"): pngs[index],
                                                 "txt": text, "json": json.dumps(meta)})
            counts[split] += 1
    return counts


def heldout_references() -> tuple[np.ndarray, np.ndarray]:
    """The held-out split's reference digits: (images (N, 8, 8) on 0..16, labels (N,))."""
    images, labels = load_digits_arrays()
    keep = np.array([is_val(i) for i in range(len(images))])
    return images[keep], labels[keep]
