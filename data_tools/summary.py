"""`flowmatch-data inspect SHARDS`: what the shards hold, and a preview grid of their first images.

Reports shard and sample counts, the member extensions samples carry, caption lengths (words and characters),
skipped records by reason, cached-feature shapes and encoders when present, and writes a PNG grid of the first
images (raw shards only: cached latents would need the autoencoder to be seen).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from flowmatch.data import decode, features
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS
from flowmatch.data.shards import expand_shards
from flowmatch.data.tarstream import BadRecord, RawSample, read_shard

PREVIEW_CELL = 64  # pixels per grid cell side
PREVIEW_GAP = 2  # white pixels between cells
PREVIEW_COUNT = 64


@dataclass
class Summary:
    """What `inspect` found."""

    shards: int = 0
    samples: int = 0
    extensions: dict[str, int] = field(default_factory=dict)
    """Samples per member-extension set, e.g. {"json+png+txt": 1617}."""
    bad: dict[str, int] = field(default_factory=dict)
    caption_words: dict[str, float] = field(default_factory=dict)
    caption_chars: dict[str, float] = field(default_factory=dict)
    first_keys: list[str] = field(default_factory=list)
    features: Optional[features.FeatureHeader] = None
    preview: Optional[str] = None

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"shards: {self.shards}", f"samples: {self.samples}"]
        out += [f"members {k}: {n} samples" for k, n in sorted(self.extensions.items())]
        out += [f"caption words: {fmt_stats(self.caption_words)}", f"caption chars: {fmt_stats(self.caption_chars)}"]
        if self.bad:
            out.append("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(self.bad.items())))
        if self.features is not None:
            f = self.features
            out.append(f"cached features: latents {list(f.latent_shape)} {f.dtype}, hidden D={f.hidden_dim}, "
                       f"pooled {f.pooled_dim}; encoders {f.encoders}")
        out.append("first keys: " + ", ".join(self.first_keys))
        if self.preview:
            out.append(f"preview: {self.preview}")
        return out


def fmt_stats(stats: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()) or "none"


def describe(values: list[int]) -> dict[str, float]:
    """min / mean / median / p95 / max of integer values."""
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "mean": statistics.fmean(ordered), "median": float(statistics.median(ordered)),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def inspect_shards(pattern: str, *, preview: Optional[str | Path] = None, preview_count: int = PREVIEW_COUNT,
                   limit: Optional[int] = None) -> Summary:
    """Read the shards (the first `limit` samples when given) and write the preview grid to `preview`."""
    urls = expand_shards(pattern)
    if not urls:
        raise FileNotFoundError(f"{pattern!r} matches no shards")
    summary = Summary()
    exts: Counter = Counter()
    bad: Counter = Counter()
    words, chars, thumbs = [], [], []
    for url in urls:
        summary.shards += 1
        for record in read_shard(url):
            if isinstance(record, BadRecord):
                bad[record.reason] += 1
                continue
            summary.samples += 1
            want_thumb = preview is not None and len(thumbs) < preview_count
            take_sample(record, summary, exts, words, chars, thumbs, want_thumb)
            if limit is not None and summary.samples >= limit:
                break
        if limit is not None and summary.samples >= limit:
            break
    summary.extensions, summary.bad = dict(exts), dict(bad)
    summary.caption_words, summary.caption_chars = describe(words), describe(chars)
    if preview is not None and thumbs:
        save_grid(thumbs, Path(preview))
        summary.preview = str(preview)
    return summary


def take_sample(record: RawSample, summary: Summary, exts: Counter, words: list, chars: list, thumbs: list,
                want_thumb: bool) -> None:
    """Fold one sample into the counters."""
    exts["+".join(sorted(record.files))] += 1
    if len(summary.first_keys) < 5:
        summary.first_keys.append(record.key)
    try:
        caption = decode.read_caption(record)
        words.append(len(caption.split()))
        chars.append(len(caption))
    except decode.BadSample:
        pass
    if summary.features is None and features.EXT in record.files:
        try:
            summary.features = features.read_header(record.files[features.EXT])
        except ValueError:
            pass
    if want_thumb:
        ext = next((e for e in decode.IMAGE_EXTS if e in record.files), None)
        if ext is not None:
            try:
                image = decode.open_image(record.files[ext], MAX_IMAGE_PIXELS).convert("RGB")
                image.thumbnail((PREVIEW_CELL, PREVIEW_CELL), Image.Resampling.NEAREST)
                thumbs.append(image)
            except Exception:  # the preview shows what decodes; verify lists the rest
                pass


def save_grid(thumbs: list[Image.Image], path: Path) -> None:
    """Paste thumbnails (upscaled with nearest neighbour to fill a cell) into a square-ish grid."""
    cols = math.ceil(math.sqrt(len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    pitch = PREVIEW_CELL + PREVIEW_GAP
    grid = Image.new("RGB", (cols * pitch + PREVIEW_GAP, rows * pitch + PREVIEW_GAP), (255, 255, 255))
    for i, thumb in enumerate(thumbs):
        scale = PREVIEW_CELL / max(thumb.size)
        cell = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                            Image.Resampling.NEAREST)
        grid.paste(cell, (PREVIEW_GAP + (i % cols) * pitch, PREVIEW_GAP + (i // cols) * pitch))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
