"""`flowmatch-data encode IN OUT --recipe R`: precompute latents and text embeddings into new shards.

For every input shard (train-* and val-* alike; names are kept, so the held-out split stays held out) it decodes the
images as training would (the recipe's data section: channels, resolution or aspect buckets), runs the recipe's
autoencoder (latents scaled and shifted by its preset) and text encoder(s) (hidden states truncated to each
caption's real tokens, and the pooled vector; with several, each encoder's under its name), and writes
`key.safetensors` (bf16 by default; see flowmatch.data.features) with the caption and any .json metadata. Training
on OUT then runs no encoder and refuses the features if the recipe's encoders differ from the fingerprints recorded
in each sample.

Each output shard is written as `NAME.partial` and renamed when complete (flowmatch.data.shardformat.ShardFile,
the writer every tool shares), and OUT/features.json records the finished ones, so an interrupted run continues
where it stopped. `--processes N` encodes N shards at a time (one encoder copy per process, spread over the
visible GPUs).
"""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from flowmatch.data import decode, features
from flowmatch.data.buckets import nearest_bucket
from flowmatch.data.loader import loader_buckets
from flowmatch.data.shardformat import SHARD_SUFFIXES, ShardFile
from flowmatch.data.shards import expand_shards, shard_name
from flowmatch.data.tarstream import BadRecord, RawSample, read_shard

MANIFEST = "features.json"
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EncodeSettings:
    """What each encoding process needs (plain data: it is sent to spawned processes)."""

    recipe: Optional[str]
    overrides: tuple[str, ...] = ()
    batch_size: int = 64
    dtype: str = "bf16"
    device: str = "auto"


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


class Encoders:
    """The recipe and its frozen encoders, built once per process."""

    def __init__(self, settings: EncodeSettings, index: int = 0) -> None:
        from flowmatch.config import load_recipe
        from flowmatch.encoders.frozen import FrozenEncoders

        self.settings = settings
        self.recipe = load_recipe(settings.recipe, list(settings.overrides))
        self.device = pick_device(settings.device, index)
        frozen = FrozenEncoders(self.recipe.text, self.recipe.autoencoder,
                                image_channels=self.recipe.data.channels, device=self.device)
        self.text, self.auto = frozen.text, frozen.autoencoder
        self.fingerprints = frozen.fingerprints()
        self.buckets = loader_buckets(self.recipe.data)


def pick_device(device: str, index: int) -> torch.device:
    """auto = GPU `index % count` when CUDA is there, else CPU."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"--device must be one of {DEVICES} or cuda:N, got {device!r}")
    if device == "auto":
        count = torch.cuda.device_count()
        return torch.device(f"cuda:{index % count}") if count else torch.device("cpu")
    return torch.device(device)


def encode_shard(enc: Encoders, url: str, target: Path, expected: Optional[dict[str, str]] = None) -> ShardResult:
    """Encode one shard into `target` (ShardFile: via target.partial); refuses when OUT already holds other encoders'
    features."""
    check_same_encoders(expected, enc.fingerprints, target.parent)
    data_cfg = enc.recipe.data
    need_size = len(enc.buckets) > 1
    bad: Counter = Counter()
    pending: dict[int, list[tuple[RawSample, decode.SampleInfo]]] = {}
    with ShardFile(target) as sink:

        def flush(bucket: int) -> None:
            group = pending.pop(bucket, [])
            size = enc.buckets[bucket]
            images, kept = [], []
            for record, info in group:
                try:
                    images.append(decode.decode_pixels(
                        record.files[info.image_ext], height=size.height, width=size.width,
                        channels=data_cfg.channels, max_pixels=data_cfg.max_image_pixels,
                    ))
                    kept.append((record, info))
                except decode.BadSample as err:
                    bad[err.reason] += 1
            if not kept:
                return
            latents = enc.auto.encode(decode.pixels_to_tensor(images).to(enc.device)).cpu()
            captions = [info.caption for _, info in kept]
            # Each encoder's own output (a single one's stored unnamed, as before), real tokens only.
            texts = ({"": enc.text.encoders[enc.text.single_name].encode(captions)} if enc.text.single_name
                     else enc.text.encode_each(captions))
            texts = {n: c.to("cpu") for n, c in texts.items()}
            for i, (record, info) in enumerate(kept):
                rows = {n: (c.hidden[i][c.mask[i]], c.pooled[i]) for n, c in texts.items()}
                blob = features.encode(latents[i], *rows.get("", (None, None)), dtype=enc.settings.dtype,
                                       encoders=enc.fingerprints, parts=None if "" in rows else rows)
                files = {features.EXT: blob, "txt": info.caption}
                if "json" in record.files:
                    files["json"] = record.files["json"]
                sink.write(record.key, files)

        for record in read_shard(url, max_member_bytes=data_cfg.max_member_bytes):
            if isinstance(record, BadRecord):
                bad[record.reason] += 1
                continue
            try:
                info = decode.peek_raw(record, max_pixels=data_cfg.max_image_pixels, need_size=need_size)
            except decode.BadSample as err:
                bad[err.reason] += 1
                continue
            bucket = nearest_bucket(enc.buckets, *info.size) if need_size else 0
            pending.setdefault(bucket, []).append((record, info))
            if len(pending[bucket]) >= enc.settings.batch_size:
                flush(bucket)
        for bucket in list(pending):
            flush(bucket)
    return ShardResult(target.name, sink.count, dict(bad), dict(enc.fingerprints))


def check_same_encoders(expected: Optional[dict[str, str]], found: dict[str, str], out: Path) -> None:
    """ValueError when OUT's manifest names other encoders than this recipe's."""
    if expected and expected != found:
        raise ValueError(
            f"{out} holds features from other encoders ({expected}) than this recipe's ({found}); "
            "encode into a new directory"
        )


# Per-process state of the --processes pool (set by the initializer; spawned processes share nothing).
_WORKER: dict[str, Encoders] = {}


def _init_worker(settings: EncodeSettings, counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["enc"] = Encoders(settings, index)


def _run_task(task: tuple[str, str, Optional[dict[str, str]]]) -> ShardResult:
    url, target, expected = task
    return encode_shard(_WORKER["enc"], url, Path(target), expected)


def output_name(url: str) -> str:
    """The output shard's file name: the input's, as an uncompressed .tar."""
    name = shard_name(url)
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name + ".tar"


def load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def encode_shards(src: str, out: str | Path, settings: EncodeSettings, *, processes: int = 1,
                  progress: bool = True) -> EncodeReport:
    """Encode every shard of pattern `src` into directory `out`, skipping shards a previous run finished."""
    from tqdm import tqdm

    urls = expand_shards(src)
    if not urls:
        raise FileNotFoundError(f"{src!r} matches no shards")
    if settings.dtype not in features.DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(features.DTYPES)}, got {settings.dtype!r}")
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (outputs are named after them)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    done = manifest.get("shards", {})
    todo = [(u, str(out / n)) for u, n in zip(urls, names) if not (n in done and (out / n).is_file())]
    report = EncodeReport(already_done=len(urls) - len(todo), encoders=manifest.get("encoders", {}))

    def record(result: ShardResult) -> None:
        check_same_encoders(manifest.get("encoders"), result.encoders, out)
        manifest.update(format=features.FORMAT, encoders=result.encoders, dtype=settings.dtype)
        manifest.setdefault("shards", {})[result.name] = {"samples": result.samples, "bad": result.bad}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        report.encoded += 1
        report.samples += result.samples
        for reason, n in result.bad.items():
            report.bad[reason] = report.bad.get(reason, 0) + n
        report.encoders = result.encoders
        bar.update(1)
        bar.set_postfix(samples=report.samples)

    bar = tqdm(total=len(todo), unit="shard", desc="encode", disable=not progress)
    expected = manifest.get("encoders")
    if processes <= 1 or not todo:  # with nothing to do, still say whether OUT matches this recipe's encoders
        enc = Encoders(settings)
        check_same_encoders(expected, enc.fingerprints, out)
        for url, target in todo:
            record(encode_shard(enc, url, Path(target), expected))
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        counter = context.Value("i", 0)
        with context.Pool(processes, initializer=_init_worker, initargs=(settings, counter)) as pool:
            for result in pool.imap_unordered(_run_task, [(u, t, expected) for u, t in todo]):
                record(result)
    bar.close()
    return report

