"""`flowmatch-data encode IN OUT --recipe R`: precompute latents and text embeddings into new shards.

The encoding itself, the output layout and the manifest that makes it resumable live in
flowmatch.encoders.cache (training uses them too, when a recipe names a `data.cache` that is missing). This
command adds the recipe file and its overrides, a storage dtype (bf16 by default; see flowmatch.data.features),
and `--processes N`: N shards encoded at a time, one encoder copy per process, spread over the visible GPUs; under
torchrun or SLURM (RANK / WORLD_SIZE set) each rank, on any node, encodes its share of the shards.
Training on OUT then runs no encoder and refuses the features if the recipe's encoders differ from the
fingerprints recorded in each sample.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from flowmatch.encoders.cache import CacheFolder, EncodeReport, ShardResult, check_same_encoders
from flowmatch.encoders.cache import encode_shard as encode_into

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EncodeSettings:
    """What each encoding process needs (plain data: it is sent to spawned processes)."""

    recipe: Optional[str]
    overrides: tuple[str, ...] = ()
    batch_size: int = 64
    dtype: str = "bf16"
    device: str = "auto"
    text_quant: str = ""
    """'' or int8 / fp8: text hidden states as one byte per value with a per-token scale."""


class Encoders:
    """The recipe and its frozen encoders, built once per process."""

    def __init__(self, settings: EncodeSettings, index: int = 0) -> None:
        from flowmatch.config import load_recipe
        from flowmatch.encoders.frozen import FrozenEncoders

        self.settings = settings
        self.recipe = load_recipe(settings.recipe, list(settings.overrides))
        self.device = pick_device(settings.device, index)
        self.frozen = FrozenEncoders(self.recipe.text, self.recipe.autoencoder,
                                     image_channels=self.recipe.data.channels, device=self.device)
        self.fingerprints = self.frozen.fingerprints()


def pick_device(device: str, index: int) -> torch.device:
    """auto = GPU `index % count` when CUDA is there, else CPU."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"--device must be one of {DEVICES} or cuda:N, got {device!r}")
    if device == "auto":
        count = torch.cuda.device_count()
        return torch.device(f"cuda:{index % count}") if count else torch.device("cpu")
    return torch.device(device)


def encode_shard(enc: Encoders, url: str, target: Path, expected: Optional[dict[str, str]] = None) -> ShardResult:
    """Encode one shard into `target` with this process's encoders (flowmatch.encoders.cache.encode_shard)."""
    return encode_into(enc.frozen, enc.recipe.data, url, target, dtype=enc.settings.dtype,
                       text_quant=enc.settings.text_quant, batch_size=enc.settings.batch_size, expected=expected)


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


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from a launcher's environment (torchrun, SLURM), else (0, 1)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def encode_shards(src: str, out: str | Path, settings: EncodeSettings, *, processes: int = 1,
                  progress: bool = True, rank: int = 0, world_size: int = 1) -> EncodeReport:
    """Encode every shard of pattern `src` into directory `out`, skipping shards a previous run finished. Under
    a launcher, rank `rank` of `world_size` encodes its share (flowmatch.encoders.cache) and the last rank to end
    merges the manifest."""
    from tqdm import tqdm

    out = Path(out)
    folder = CacheFolder(src, out, settings.dtype, rank=rank, world_size=world_size)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(folder.todo), unit="shard", desc="encode", disable=not progress)

    def record(result: ShardResult) -> None:
        folder.record(result)
        bar.update(1)
        bar.set_postfix(samples=folder.report.samples)

    expected = folder.expected
    if processes <= 1 or not folder.todo:  # with nothing to do, still say whether OUT matches this recipe's encoders
        enc = Encoders(settings)
        check_same_encoders(expected, enc.fingerprints, out)
        for url, target in folder.todo:
            record(encode_shard(enc, url, target, expected))
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        counter = context.Value("i", 0)
        with context.Pool(processes, initializer=_init_worker, initargs=(settings, counter)) as pool:
            for result in pool.imap_unordered(_run_task, [(u, str(t), expected) for u, t in folder.todo]):
                record(result)
    bar.close()
    folder.finish()
    return folder.report
