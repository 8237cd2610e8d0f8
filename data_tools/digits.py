"""`flowmatch-data digits OUT`: scikit-learn's 1,797 handwritten digits as captioned shards.

Each 8x8 image (values 0..16) is stored as an 8x8 grayscale PNG with value round(v * 255 / 16), i.e.
(v * 255 + 8) // 16, so 0 -> 0 and 16 -> 255 exactly. Captions come from `caption_templates()` (words and
numerals), chosen per image by a seeded generator so every template appears and rebuilding gives the same
shards. `heldout_prompts(d)` are paraphrases that never appear in training captions, for prompt-following evals.
About 10% of the images (chosen by a hash of their index) go to `val-*.tar`, the rest to `train-*.tar`.
`data_tools.digits_task` makes this the `digits` task (recipes: data.prepare: digits, eval.task: digits).
Dataset: Alpaydin & Kaynak, UCI Optical Recognition of Handwritten Digits (scikit-learn's load_digits).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from flowmatch.data.shardformat import TRAIN_PREFIX, VAL_PREFIX, ShardSink

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIDE = 8
MAX_VALUE = 16  # load_digits pixel values are counts 0..16 of a 4x4 block
VAL_PERCENT = 10
DEFAULT_SEED = 0
DEFAULT_SHARD_SIZE = 256

# {w} = the digit as a word, {n} = as a numeral.
TEMPLATES = (
    "a handwritten digit {w}",
    "a handwritten {n}",
    "the number {w}, handwritten",
    "digit {n}",
    "a scanned handwritten {w}",
    "the digit {n} written by hand",
    "a low resolution image of the number {w}",
    "handwritten number {n}",
    "a pixelated {w}",
    "an 8x8 image of the digit {n}",
    "a blurry handwritten {w} on a black background",
    "the numeral {w}",
    "a {n} drawn by hand",
    "a black and white handwritten {n}",
)
# Paraphrases kept out of training, for checking that the model follows unseen wordings of the same digit.
HELDOUT_TEMPLATES = (
    "a picture of the numeral {n}",
    "number {n} written by hand",
    "someone wrote the digit {w}",
    "a tiny grayscale {w}",
    "{w}",
)


def caption_templates() -> tuple[str, ...]:
    """The training caption templates ({w} word, {n} numeral)."""
    return TEMPLATES


def captions_for(digit: int) -> list[str]:
    """Every training caption of `digit`."""
    return [t.format(w=DIGIT_WORDS[digit], n=digit) for t in TEMPLATES]


def heldout_prompts(digit: int) -> list[str]:
    """Eval prompts for `digit` that never occur as training captions."""
    return [t.format(w=DIGIT_WORDS[digit], n=digit) for t in HELDOUT_TEMPLATES]


def is_val(index: int) -> bool:
    """The held-out split: a stable hash of the image index, about VAL_PERCENT percent."""
    return int(hashlib.sha1(f"digits-{index}".encode()).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def to_png(values: np.ndarray) -> bytes:
    """(8, 8) values 0..16 -> grayscale PNG bytes, 0..255."""
    pixels = ((values.astype(np.int64) * 255 + MAX_VALUE // 2) // MAX_VALUE).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) int 0..16, labels (1797,)) from scikit-learn (bundled with it, no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits builder needs scikit-learn: pip install 'flowmatch[demo]'") from None
    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)


def write_digits(out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = DEFAULT_SEED,
                 overwrite: bool = False, captions: Callable[[int], list[str]] | None = None) -> dict[str, int]:
    """Write train-*.tar and val-*.tar into `out`; returns {"train": n, "val": m}. ``captions(digit)`` gives the
    wordings a sample's caption is drawn from (default :func:`captions_for`, the training wordings)."""
    captions = captions_for if captions is None else captions
    images, labels = load_digits_arrays()
    rng = random.Random(seed)
    order = list(range(len(images)))
    rng.shuffle(order)  # sklearn's order runs through the classes in sequence; shards should each be a fair mix
    counts = {"train": 0, "val": 0}
    with ShardSink(out, prefix=TRAIN_PREFIX, shard_size=shard_size, overwrite=overwrite) as train, \
            ShardSink(out, prefix=VAL_PREFIX, shard_size=shard_size, overwrite=overwrite) as val:
        for index in order:
            label = int(labels[index])
            caption = rng.choice(captions(label))
            split = "val" if is_val(index) else "train"
            sink = val if split == "val" else train
            meta = {"label": label, "caption": caption, "index": index}
            sink.write(f"digit-{index:04d}", {"png": to_png(images[index]), "txt": caption, "json": json.dumps(meta)})
            counts[split] += 1
    return counts
