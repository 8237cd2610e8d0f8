"""Cached features: shards re-written with each sample's latents and text embeddings, so training runs no encoder.

For every input shard (train-* and val-* alike; names are kept, so the held-out split stays held out) the
images are decoded as training would (the data section: channels, resolution or aspect buckets) and run through
the frozen autoencoder (latents scaled and shifted by its preset; a paired sample's reference images too, at its
target's size, stored as its `references`) and text encoder(s) (hidden states truncated to
each caption's real tokens, and the pooled vector; with several, each encoder's under its name); each sample
becomes `key.safetensors` (flowmatch.data.features) beside its caption and any .json metadata. Each output shard
is written as `NAME.partial` and renamed when complete (flowmatch.data.shardformat.ShardFile), and OUT/features.json
records the finished ones and the encoders' fingerprints, so an interrupted run continues where it stopped and a
folder never mixes the features of two encoders. Every rank of a job builds the cache together: rank r of W encodes
the input shards r, r + W, r + 2W, ... (of the whole list, so the split does not depend on what an earlier run
finished) with its own copy of the encoders, and records its finished shards in its own part file,
``features.json.part-<r>-of-<W>``; the rank that finds every part of the job complete when it ends merges them into
``features.json`` (the merge is idempotent, so two ranks finishing together write the same file) and removes them. A
build that stops half way leaves part files, which count as finished shards for the next build, whatever its number
of ranks. `flowmatch-data encode` (data_tools/encode.py) runs this over processes and GPUs; a recipe's `data.cache`
makes training run it in-process when the cache is missing or incomplete (:func:`ensure_cache`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from flowmatch.data import decode, features
from flowmatch.data.buckets import nearest_bucket
from flowmatch.data.config import DataConfig
from flowmatch.data.loader import loader_buckets
from flowmatch.data.masks import MASK_MEMBER, decode_mask, mask_png
from flowmatch.data.shardformat import SHARD_SUFFIXES, ShardFile
from flowmatch.data.shards import expand_shards, shard_name
from flowmatch.data.tarstream import BadRecord, RawSample, read_shard
from flowmatch.encoders.frozen import seen_references
from flowmatch.errors import RecipeError

if TYPE_CHECKING:
    from flowmatch.encoders.frozen import FrozenEncoders

log = logging.getLogger("flowmatch.encoders")

MANIFEST = "features.json"
_PART = ".part-"


def _write_json(path: Path, obj: dict) -> None:
    """Replace ``path`` atomically (readers see the old file or the new one, never a part)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclass
class ShardResult:
    """One encoded shard."""

    name: str
    samples: int
    bad: dict[str, int] = field(default_factory=dict)
    encoders: dict[str, str] = field(default_factory=dict)


@dataclass
class EncodeReport:
    """What a run did: shards encoded now, shards found done from an earlier run, samples, skips by reason."""

    encoded: int = 0
    already_done: int = 0
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    encoders: dict[str, str] = field(default_factory=dict)


def encode_shard(frozen: "FrozenEncoders", data: DataConfig, url: str, target: Path, *, dtype: str = "bf16",
                 batch_size: int = 64, expected: Optional[dict[str, str]] = None,
                 text_quant: str = "") -> ShardResult:
    """Encode one shard into `target` (via target.partial); refuses when OUT already holds other encoders'
    features (`expected`: the manifest's fingerprints). `text_quant` int8 / fp8 stores the text hidden states as
    one byte per value with a per-token scale."""
    fingerprints = frozen.fingerprints()
    check_same_encoders(expected, fingerprints, target.parent)
    buckets = loader_buckets(data)
    need_size = len(buckets) > 1
    bad: Counter = Counter()
    pending: dict[tuple[int, int], list[tuple[RawSample, decode.SampleInfo]]] = {}
    with ShardFile(target) as sink:

        def flush(bucket: tuple[int, int]) -> None:  # (aspect bucket, reference count)
            group = pending.pop(bucket, [])
            bucket_size = buckets[bucket[0]]
            size = dict(height=bucket_size.height, width=bucket_size.width, channels=data.channels,
                        max_pixels=data.max_image_pixels)
            images, refs, kept, masks = [], [], [], []
            for record, info in group:
                try:
                    pixels = decode.decode_pixels(record.files[info.image_ext], **size)
                    if info.references:
                        refs.extend(decode.decode_references(record, info, **size))
                    # the loss mask, cropped as the image: training on the cache reads it back (data.masks)
                    mask = decode_mask(record, info.image_ext, height=bucket_size.height, width=bucket_size.width,
                                       max_pixels=data.max_image_pixels, alpha=data.alpha_masks) if data.masks else None
                    images.append(pixels)
                    masks.append(mask)
                    kept.append((record, info))
                except decode.BadSample as err:
                    bad[err.reason] += 1
            if not kept:
                return
            latents = frozen.autoencoder.encode(decode.pixels_to_tensor(images).to(frozen.device)).cpu()
            ref_latents, seen = [None] * len(kept), None
            if refs:  # every sample of the group has the same number of references (it is part of the group key)
                pixels = decode.pixels_to_tensor(refs)  # (B * R, C, H, W)
                pixels = pixels.reshape(len(kept), -1, *pixels.shape[1:])
                ref_latents = list(frozen.encode_references(pixels).cpu())
                seen = seen_references(pixels) if frozen.sees_images else None
            elif frozen.sees_images:
                raise RecipeError("the text encoder reads each caption with its reference image (text_encoder."
                                  "processor_subfolder), but these samples have none: set data.paired: true on "
                                  "paired shards, or remove processor_subfolder")
            captions = [info.caption for _, info in kept]
            # Each encoder's own output (a single one's stored unnamed), real tokens only; an encoder that sees
            # images reads each caption with the sample's first reference (Qwen-Image-Edit).
            text = frozen.text
            texts = text.encode_each(captions, seen)
            if text.single_name:
                texts = {"": texts[text.single_name]}
            texts = {n: c.to("cpu") for n, c in texts.items()}
            for i, (record, info) in enumerate(kept):
                rows = {n: (c.hidden[i][c.mask[i]], c.pooled[i]) for n, c in texts.items()}
                blob = features.encode(latents[i], *rows.get("", (None, None)), dtype=dtype, encoders=fingerprints,
                                       parts=None if "" in rows else rows, text_quant=text_quant,
                                       references=ref_latents[i])
                files = {features.EXT: blob, "txt": info.caption}
                if masks[i] is not None:
                    files[MASK_MEMBER] = mask_png(masks[i])
                if "json" in record.files:
                    files["json"] = record.files["json"]
                sink.write(record.key, files)

        for record in read_shard(url, max_member_bytes=data.max_member_bytes):
            if isinstance(record, BadRecord):
                bad[record.reason] += 1
                continue
            try:
                info = decode.peek_raw(record, max_pixels=data.max_image_pixels, need_size=need_size,
                                       paired=data.paired)
            except decode.BadSample as err:
                bad[err.reason] += 1
                continue
            bucket = (nearest_bucket(buckets, *info.size) if need_size else 0, len(info.references))
            pending.setdefault(bucket, []).append((record, info))
            if len(pending[bucket]) >= batch_size:
                flush(bucket)
        for bucket in list(pending):
            flush(bucket)
    return ShardResult(target.name, sink.count, dict(bad), dict(fingerprints))


def check_same_encoders(expected: Optional[dict[str, str]], found: dict[str, str], out: Path) -> None:
    """ValueError when OUT's manifest names other encoders than this recipe's."""
    if expected and expected != found:
        raise ValueError(
            f"{out} holds features from other encoders ({expected}) than this recipe's ({found}); "
            "encode into a new directory"
        )


def output_name(url: str) -> str:
    """The output shard's file name: the input's, as an uncompressed .tar."""
    name = shard_name(url)
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name + ".tar"


class CacheFolder:
    """OUT and its manifest: which input shards still need encoding, and recording the finished ones."""

    def __init__(self, src: str, out: str | Path, dtype: str, *, rank: int = 0, world_size: int = 1) -> None:
        if dtype not in features.DTYPES:
            raise ValueError(f"feature dtype must be one of {tuple(features.DTYPES)}, got {dtype!r}")
        self.urls = expand_shards(src)
        if not self.urls:
            raise FileNotFoundError(f"{src!r} matches no shards")
        names = [output_name(u) for u in self.urls]
        if len(set(names)) != len(names):
            raise ValueError("input shards must have distinct file names (outputs are named after them)")
        self.out, self.dtype = Path(out), dtype
        self.rank, self.world_size = rank, world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        path = self.out / MANIFEST
        self.manifest: dict = json.loads(path.read_text()) if path.is_file() else {}
        self._fold_parts(self.manifest)
        done = self.manifest.get("shards", {})
        todo = [(u, self.out / n) for u, n in zip(self.urls, names) if not (n in done and (self.out / n).is_file())]
        # This rank's share: by place in the whole list, so that every rank agrees whenever it started.
        mine = set(names[rank::world_size])
        self.todo = [(u, t) for u, t in todo if t.name in mine]
        self.report = EncodeReport(already_done=len(self.urls) - len(todo),
                                   encoders=self.manifest.get("encoders", {}))
        self._part = self.out / f"{MANIFEST}{_PART}{rank}-of-{world_size}"
        self._mine: dict = {}

    def _parts(self) -> list[Path]:
        return sorted(self.out.glob(f"{MANIFEST}{_PART}*"))

    def _fold_parts(self, manifest: dict) -> bool:
        """Add the shards of every part file to ``manifest``; whether each part of this job is complete."""
        complete = set()
        for part in self._parts():
            try:
                found = json.loads(part.read_text())
            except (OSError, ValueError):  # removed by a merging rank meanwhile, or cut short: its shards count
                continue                   # as missing and are encoded again
            if found.get("encoders"):
                check_same_encoders(manifest.get("encoders"), found["encoders"], self.out)
                manifest.update(format=found["format"], encoders=found["encoders"], dtype=found["dtype"])
            manifest.setdefault("shards", {}).update(found.get("shards", {}))
            if found.get("complete"):
                complete.add(part.name)
        return all(f"{MANIFEST}{_PART}{r}-of-{self.world_size}" in complete for r in range(self.world_size))

    def finish(self) -> None:
        """Mark this rank's share done; the rank that finds every share of the job done merges the manifest."""
        self._write_part(complete=True)
        merged = json.loads((self.out / MANIFEST).read_text()) if (self.out / MANIFEST).is_file() else {}
        if not self._fold_parts(merged):
            return
        if merged.get("shards"):
            _write_json(self.out / MANIFEST, merged)
        for part in self._parts():
            part.unlink(missing_ok=True)

    def _write_part(self, complete: bool) -> None:
        if self.world_size == 1 and not complete:
            return  # one rank writes the manifest itself
        part = {"format": features.FORMAT, "encoders": self.manifest.get("encoders", {}), "dtype": self.dtype,
                "shards": self._mine, "complete": complete}
        _write_json(self._part, part)

    @property
    def expected(self) -> Optional[dict[str, str]]:
        """The fingerprints of the features already in OUT (None when it holds none)."""
        return self.manifest.get("encoders")

    def record(self, result: ShardResult) -> None:
        """Add a finished shard to the manifest (rewritten at once) and the report."""
        check_same_encoders(self.expected, result.encoders, self.out)
        m, report = self.manifest, self.report
        m.update(format=features.FORMAT, encoders=result.encoders, dtype=self.dtype)
        entry = {"samples": result.samples, "bad": result.bad}
        m.setdefault("shards", {})[result.name] = self._mine[result.name] = entry
        if self.world_size == 1:
            _write_json(self.out / MANIFEST, m)
        else:  # the other ranks write the manifest too: each keeps its own part until the merge
            self._write_part(complete=False)
        report.encoded += 1
        report.samples += result.samples
        for reason, n in result.bad.items():
            report.bad[reason] = report.bad.get(reason, 0) + n
        report.encoders = result.encoders


def ensure_cache(data: DataConfig, frozen: "FrozenEncoders", *, rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> Optional[EncodeReport]:
    """Encode `data.shards` into `data.cache` with these encoders when any shard is missing there; None when there
    is no cache to make. Every rank calls it with its own encoders and encodes its share (see the module
    docstring); barrier afterwards, before reading the cache. Features of other encoders in the folder are an
    error."""
    from tqdm import tqdm  # the progress bar's import is deferred: most runs find the cache complete

    if not data.cache:
        return None
    out = Path(data.cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    folder = CacheFolder(data.shards, out, data.cache_dtype, rank=rank, world_size=world_size)
    check_same_encoders(folder.expected, frozen.fingerprints(), out)
    if folder.report.already_done == len(folder.urls):
        return folder.report
    if folder.todo:
        log.warning("data: rank %d encoding %d shards of %s into the cache %s (data.cache)", rank, len(folder.todo),
                    data.shards, out)
    for url, target in tqdm(folder.todo, unit="shard", desc="encode", disable=not progress):
        folder.record(encode_shard(frozen, data, url, target, dtype=data.cache_dtype, expected=folder.expected,
                                   text_quant=data.cache_text_quant))
    folder.finish()
    return folder.report
