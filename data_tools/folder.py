"""`flowmatch-data folder SRC OUT`: a folder of images with same-name captions -> shards.

`cats/01.jpg` + `cats/01.txt` (or `cats/01.json` with a "caption" field) become sample `cats_01` with members
jpg, txt and json (the source path, plus the .json's own fields); a `cats/01.mask.png` beside them becomes
its `mask.png` member (where the loss counts: white in, black out; flowmatch.data.masks). The image bytes are
stored as they are (no re-encoding), after a full decode proves them sound. Bad entries never stop the build:
an undecodable or oversized image, an image without a caption, a caption without an image, an empty caption are
skipped and listed in OUT/report.json and the printed summary.

Paired (editing) samples: the .json's `reference` field (`--reference-field`) names the reference image(s), a
path or a list of paths relative to the entry's folder; they are stored as `ref.EXT`, `ref_1.EXT`, ... beside the
target (flowmatch.data.shardformat), and the caption is the instruction. An entry whose reference is missing or
undecodable is skipped and reported; images serving only as references are not reported as uncaptioned.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data_tools.images import (
    REFERENCE_FIELD,
    SOURCE_EXTS,
    ImageRejected,
    check_image,
    reference_files,
    reference_sources,
)
from data_tools.report import BuildReport
from flowmatch.data.shardformat import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, MIB, ShardSink, safe_key

CAPTION_EXTS = (".txt", ".json")
#: A training mask's file name ending, beside its image: NAME.mask.png.
MASK_SUFFIX = ".mask.png"


@dataclass
class Entry:
    """Files sharing one path stem under SRC."""

    stem: str
    images: list[Path] = field(default_factory=list)
    txt: Optional[Path] = None
    json: Optional[Path] = None
    mask: Optional[Path] = None


def scan(src: Path, report: BuildReport) -> list[Entry]:
    """Group the files under `src` by relative path without extension, sorted; unsupported files are reported."""
    entries: dict[str, Entry] = {}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            if rel.lower().endswith(MASK_SUFFIX):
                entries.setdefault(rel[:-len(MASK_SUFFIX)], Entry(rel[:-len(MASK_SUFFIX)])).mask = path
                continue
            stem, ext = os.path.splitext(rel)
            ext = ext.lower()
            if ext not in SOURCE_EXTS + CAPTION_EXTS:
                report.skip(rel, "unsupported file type")
                continue
            entry = entries.setdefault(stem, Entry(stem))
            if ext in SOURCE_EXTS:
                entry.images.append(path)
            elif ext == ".txt":
                entry.txt = path
            else:
                entry.json = path
    return [entries[k] for k in sorted(entries)]


def read_caption(entry: Entry) -> tuple[str, dict]:
    """(caption, json metadata); ValueError with the reason when there is no usable caption."""
    meta: dict = {}
    if entry.json is not None:
        try:
            loaded = json.loads(entry.json.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"unreadable json ({err})") from None
        meta = loaded if isinstance(loaded, dict) else {"value": loaded}
    if entry.txt is not None:
        try:
            caption = entry.txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"caption not utf-8 ({err})") from None
    else:
        caption = meta.get("caption", meta.get("text", ""))
        if not isinstance(caption, str):
            raise ValueError("json caption is not text")
        if entry.json is not None and not caption:
            raise ValueError("json without caption")
        caption = caption.strip()
    if not caption:
        raise ValueError("empty caption")
    return caption, meta


def read_bounded(path: Path) -> bytes:
    """The file's bytes; ValueError when it is larger than a shard member may be (OSError when unreadable)."""
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise ValueError(f"oversized file ({path.stat().st_size // MIB} MiB)")
    return path.read_bytes()


def referenced_images(entries: list[Entry], field: str) -> set[Path]:
    """Every image some entry's .json names as its reference (unreadable metadata is reported with its entry)."""
    found: set[Path] = set()
    for entry in entries:
        if entry.json is None:
            continue
        try:
            meta = json.loads(entry.json.read_text(encoding="utf-8"))
            names = reference_sources(meta, field) if isinstance(meta, dict) else []
        except (ValueError, UnicodeDecodeError):
            continue
        found.update((entry.json.parent / name).resolve() for name in names)
    return found


def build_folder(src: str | Path, out: str | Path, *, shard_size: int = 1000, seed: int = 0, shuffle: bool = True,
                 max_pixels: int = MAX_IMAGE_PIXELS, overwrite: bool = False,
                 reference_field: str = REFERENCE_FIELD) -> BuildReport:
    """Write the shards and OUT/report.json; returns the report. Raises only for unusable SRC/OUT."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a directory of images")
    report = BuildReport()
    entries = scan(src, report)
    referenced = referenced_images(entries, reference_field)
    if shuffle:  # folders are often sorted by class; mix them so each shard is a fair sample
        random.Random(seed).shuffle(entries)
    used: set[str] = set()
    with ShardSink(out, prefix="shard", shard_size=shard_size, overwrite=overwrite) as sink:
        for entry in entries:
            written = write_entry(entry, sink, used, report, src, max_pixels, reference_field, referenced)
            report.written += written
    report.shards = [p.name for p in sink.paths]
    report.save(out / "report.json")
    return report


def write_entry(entry: Entry, sink: ShardSink, used: set[str], report: BuildReport, src: Path,
                max_pixels: int, reference_field: str = REFERENCE_FIELD,
                referenced: frozenset | set = frozenset()) -> int:
    """Write one entry (1) or report why not (0)."""
    captions = [p for p in (entry.txt, entry.json) if p is not None]
    if not entry.images:
        for path in captions + ([entry.mask] if entry.mask else []):
            report.skip(path.relative_to(src).as_posix(), "caption without image")
        return 0
    image_path = entry.images[0]
    rel = image_path.relative_to(src).as_posix()
    for extra in entry.images[1:]:
        report.skip(extra.relative_to(src).as_posix(), f"second image for {entry.stem} (kept {image_path.name})")
    if not captions:
        if image_path.resolve() not in referenced:
            report.skip(rel, "image without caption")
        return 0
    try:
        caption, meta = read_caption(entry)
    except ValueError as err:
        report.skip(rel, str(err))
        return 0
    try:
        data = read_bounded(image_path)
    except ValueError as err:
        report.skip(rel, str(err))
        return 0
    try:
        ext = check_image(data, max_pixels=max_pixels)
        names = reference_sources(meta, reference_field)
        refs = reference_files([read_bounded(image_path.parent / name) for name in names], max_pixels=max_pixels)
    except (ImageRejected, ValueError) as err:
        report.skip(rel, str(err))
        return 0
    except OSError as err:
        report.skip(rel, f"unreadable reference ({type(err).__name__}: {err})")
        return 0
    members = {ext: data, "txt": caption, **refs, "json": json.dumps({"source": rel, **meta}, ensure_ascii=False)}
    if entry.mask is not None:
        mask = entry.mask.read_bytes()
        try:
            if check_image(mask, max_pixels=max_pixels) != "png":
                raise ImageRejected("not a png")
        except ImageRejected as err:
            report.skip(entry.mask.relative_to(src).as_posix(), f"{err} (the image is kept without a mask)")
        else:
            members["mask.png"] = mask
    key = safe_key(entry.stem)
    base, n = key, 1
    while key in used:  # two stems may sanitize alike ("a b" and "a_b")
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    sink.write(key, members)
    return 1
