"""The training data loader: WebDataset shards -> `Batch`es, split over ranks and workers, exact to resume.

Each rank runs `num_workers` DataLoader workers, one stream each (flowmatch.data.stream); torch's DataLoader
takes batches from its workers in strict rotation, so the sequence a rank sees is fixed by the streams. The
loader remembers, per stream, the position after the last batch it handed out (not after the batches workers
prefetched), plus which worker comes next; `state_dict()` saves that and a new loader given it starts each
worker where its stream stopped, with the rotation turned so the next batch is the one that was due (a position
names the records a stream holds, not how many it has read, so resuming costs the same anywhere in an epoch). The
training split runs forever (epoch after epoch; the trainer counts steps), which also means ranks whose
shards hold different sample counts never wait on each other; the val split is one unshuffled pass per
`iter()`, or exactly `max_batches` per rank (cycling) so that ranks stay in step in distributed evaluation.
Design anchors: torchtitan's stateful FLUX dataloader and MosaicML streaming's deterministic resumption.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowmatch.data.batch import Batch
from flowmatch.data.buckets import Bucket, make_buckets
from flowmatch.data.config import DataConfig
from flowmatch.data.drain import ELASTIC_KEYS, Drain, drain_chain, held_records
from flowmatch.data.features import check_encoders
from flowmatch.data.opener import SHARD_FAILED, UNREADABLE
from flowmatch.data.probe import detect_cached, read_cache_header
from flowmatch.data.shards import resolve_sources
from flowmatch.data.stream import DataUnavailable, Position, StreamSpec, advance_epoch, run_stream, start_positions
from flowmatch.data.workers import die_with_parent

log = logging.getLogger("flowmatch.data")

STATE_FORMAT = "flowmatch-loader-2"
OLD_FORMATS = ("flowmatch-loader-1",)  # positions counted in batches: loaded as the start of the next epoch


@dataclass
class LoaderStats:
    """Counters of one rank's loader since the run began (resumed runs continue them).

    samples: samples handed to the trainer; bad: samples and records skipped; reasons: bad counts by reason;
    epoch: the lowest epoch any of this rank's workers is in; sources: samples handed out per data source.
    """

    samples: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def failed_shards(self) -> int:
        """Shards skipped because they could not be read (remote ones after every retry)."""
        return self.reasons.get(SHARD_FAILED, 0) + self.reasons.get(UNREADABLE, 0)


class _WorkerStreams(IterableDataset):
    """What each DataLoader worker iterates: the stream of (rank, worker + rotation), after the earlier layouts'
    streams it finishes; items are (batch, this stream, drain index or -1, position)."""

    def __init__(self, spec: StreamSpec, rank: int, workers: int, starts: dict[int, Position], rotation: int,
                 drains: list[Drain]):
        super().__init__()
        self.spec, self.rank, self.workers, self.starts, self.rotation = spec, rank, workers, starts, rotation
        self.drains = drains

    def __iter__(self) -> Iterator[tuple[Batch, int, int, Position]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.rank * self.workers + (worker + self.rotation) % self.workers
        try:
            for g, old in drain_chain(self.drains, stream, self.spec.num_streams):
                drain = self.drains[g]
                for batch, position in run_stream(drain.spec(self.spec), drain.positions[old]):
                    yield batch, stream, g, position
            for batch, position in run_stream(self.spec, self.starts[stream]):
                yield batch, stream, -1, position
        except DataUnavailable as err:  # handed over as a value: the user sees its paragraph, not a worker traceback
            yield err, stream, -1, None


class Loader:
    """Iterable of `Batch`. Iterating again continues where the last batch handed out left off (train split).

    Attributes: `cached` (True when batches carry latents and text embeddings), `urls` (this split's shards),
    `stats` (LoaderStats), `bad_samples` (int).
    """

    def __init__(self, spec: StreamSpec, *, rank: int, world_size: int, processes: int, prefetch_factor: int,
                 resumable: bool, max_batches: Optional[int], layout: dict) -> None:
        self.spec = spec
        self.rank, self.world_size, self.processes = rank, world_size, processes
        self.workers = max(1, processes)  # streams per rank: one per worker process, or one in-process
        self.prefetch_factor = prefetch_factor
        self.resumable = resumable
        self.max_batches = max_batches
        self.layout = layout
        self.cached = spec.cached
        self.urls = list(spec.urls)
        self.source_names = [part.name or f"source{i}" for i, part in enumerate(spec.sources)]
        self._streams = [rank * self.workers + w for w in range(self.workers)]
        self._positions = start_positions(self._streams)
        self._next_worker = 0
        self._drains: list[Drain] = []

    # ------------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        if not self.resumable:  # every pass over the val split starts afresh (and so do its counters)
            self._positions, self._next_worker = start_positions(self._streams), 0
        drains = [Drain(d.layout, d.stop, dict(d.positions)) for d in self._drains]
        dataset = _WorkerStreams(self.spec, self.rank, self.workers, dict(self._positions), self._next_worker,
                                 drains)
        if self.processes == 0:
            source: Iterator = iter(dataset)
        else:
            source = iter(
                DataLoader(
                    dataset,
                    batch_size=None,  # workers batch per bucket themselves
                    num_workers=self.workers,
                    prefetch_factor=self.prefetch_factor,
                    pin_memory=torch.cuda.is_available(),
                    worker_init_fn=functools.partial(die_with_parent, os.getpid()),
                )
            )
        handed = 0
        for batch, stream, drain, position in source:
            if isinstance(batch, DataUnavailable):
                raise DataUnavailable(str(batch)) from None
            # What a stream finishes comes in order: whatever precedes this batch's source in its chain is done.
            for g, old in drain_chain(self._drains, stream, self.spec.num_streams):
                if (g, old) == (drain, position.stream):
                    break
                del self._drains[g].positions[old]
            if drain < 0:
                self._positions[stream] = position
            else:
                self._drains[drain].positions[position.stream] = position
            # Workers take strict turns, so the stream after this one is due next; a resumed loader hands that
            # stream to worker 0, which the DataLoader asks first.
            self._next_worker = (stream - self.rank * self.workers + 1) % self.workers
            yield batch
            handed += 1
            if self.max_batches is not None and handed >= self.max_batches:
                return

    # ------------------------------------------------------------------------------------------- counters

    @property
    def stats(self) -> LoaderStats:
        """This rank's counters (sum them over ranks for a global count)."""
        reasons: dict[str, int] = {}
        sources = dict.fromkeys(self.source_names, 0)
        for p in self._positions.values():
            for reason, n in p.bad.items():
                reasons[reason] = reasons.get(reason, 0) + n
            for name, n in zip(self.source_names, p.sources):
                sources[name] += n
        return LoaderStats(
            samples=sum(p.samples for p in self._positions.values()),
            bad=sum(reasons.values()),
            reasons=reasons,
            epoch=min(p.epoch for p in self._positions.values()),
            sources=sources,
        )

    @property
    def bad_samples(self) -> int:
        """Samples and records this rank skipped as bad so far."""
        return self.stats.bad

    # ------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """This rank's position: plain types (JSON-able). Save one per rank, or merge all ranks' with
        `merge_loader_states` and give every rank the merged dict."""
        return {
            "format": STATE_FORMAT,
            "layout": dict(self.layout),
            "streams": {str(s): self._positions[s].to_dict() for s in self._streams},
            "next_worker": {str(self.rank): self._next_worker},
            "drains": [d.to_dict() for d in self._drains],
        }

    def load_state_dict(self, state: Mapping, *, strict: bool = True) -> None:
        """Continue from `state` (this rank's own, or a merged one). Call before iterating.

        A resume is exact (every sample of every epoch once) when the saved layout differs from this one in
        world size, workers, per-rank batch size or shuffle buffer at most (a merged state then: see
        :class:`Drain`; a data.sources mixture only in the per-rank batch size). Other changes (shards, seed,
        buckets, ...) cannot be: strict=True raises ValueError naming the differences, and strict=False starts
        every worker at the epoch after the furthest saved one, logging how many samples that skips.
        """
        old = state.get("format") in OLD_FORMATS
        if state.get("format") != STATE_FORMAT and not old:
            raise ValueError(f"not a loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        saved = state.get("layout", {})
        differ = sorted(k for k in set(saved) | set(self.layout) if saved.get(k) != self.layout.get(k))
        streams = state.get("streams", {})
        drains = [Drain.from_dict(d) for d in state.get("drains", [])]
        if set(differ) <= {"batch_size"}:
            differ = []  # the same streams: they regroup the records they hold into batches of the new size
        elif set(differ) <= ELASTIC_KEYS and not self.spec.mixture and not old:
            self._resume_elsewhere(saved, streams, drains)
            return
        if old:
            differ.append("format")
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {self.layout.get(k)!r}" for k in differ if k != "format")
            if old:
                changes = f"saved by an older loader ({state.get('format')}){', ' + changes if changes else ''}"
            if strict:
                raise ValueError(
                    f"the data loader state was saved with a different data layout ({changes}); exact resume needs "
                    "the same settings. Restore them, or load with strict=False to start at the next epoch."
                )
            epoch = 1 + max((int(p["epoch"]) for p in streams.values()), default=-1)
            held = sum(held_records(p["detail"]) for p in streams.values() if "detail" in p)
            log.warning("data: layout changed (%s), which no resume can follow exactly; starting every worker at "
                        "epoch %d: the samples of the epochs before it not handed out yet are skipped, %d held in "
                        "the saved buffers and partial batches plus the unread rest of their shards (%d handed "
                        "out so far)", changes, epoch, held, sum(int(p["samples"]) for p in streams.values()))
            self._positions = {s: advance_epoch(Position(s), epoch) for s in self._streams}
            self._next_worker = 0
            self._drains = []
            return
        missing = [s for s in self._streams if str(s) not in streams]
        if missing:
            raise ValueError(
                f"the loader state has no position for rank {self.rank}'s workers (streams {missing}); pass the "
                "state this rank saved, or the merge of every rank's (merge_loader_states)"
            )
        self._positions = {s: Position.from_dict(s, streams[str(s)]) for s in self._streams}
        self._next_worker = int(state.get("next_worker", {}).get(str(self.rank), 0)) % self.workers
        self._drains = self._own_drains(drains)

    def _own_drains(self, drains: list[Drain]) -> list[Drain]:
        """The unfinished streams of ``drains`` that this rank's streams finish (the others' are theirs)."""
        mine = set(self._streams)
        return [Drain(d.layout, d.stop, {o: p for o, p in d.positions.items() if o % self.spec.num_streams in mine})
                for d in drains if d.positions]

    def _resume_elsewhere(self, saved: dict, streams: Mapping, drains: list[Drain]) -> None:
        """Continue a merged state saved by another layout exactly: its streams become a :class:`Drain`."""
        expected = saved["world_size"] * saved["num_workers"]
        if len(streams) != expected:
            raise ValueError(f"the loader state was saved by {saved['world_size']} rank(s) x {saved['num_workers']} "
                             f"worker(s) but holds {len(streams)} stream position(s): resuming on another layout "
                             "needs the merge of every rank's state (merge_loader_states)")
        positions = {int(s): Position.from_dict(int(s), p) for s, p in streams.items()}
        # The furthest epoch any stream has begun, and every earlier one, are finished by the saved streams.
        stop = max(p.epoch + (p.detail is not None) for p in positions.values())
        drains = [*drains, Drain(dict(saved), stop, positions)]
        start = max(d.stop for d in drains)
        self._positions = {s: advance_epoch(Position(s), start) for s in self._streams}
        self._next_worker = 0
        self._drains = self._own_drains(drains)
        held = sum(held_records(p.detail) for p in positions.values() if p.detail is not None)
        log.warning("data: resuming a position saved by %d rank(s) x %d worker(s) on %d x %d: the saved streams "
                    "finish epoch(s) up to %d (%d sample(s) in their buffers and partial batches included), then "
                    "this layout's streams start epoch %d; no sample is skipped or repeated",
                    saved["world_size"], saved["num_workers"], self.world_size, self.workers, stop - 1, held, start)


def merge_loader_states(states: list[Mapping]) -> dict:
    """One state holding every rank's streams (e.g. from all_gather_object), loadable on any rank."""
    if not states:
        raise ValueError("merge_loader_states needs at least one state")
    layouts = {repr(sorted(s.get("layout", {}).items())) for s in states}
    if len(layouts) > 1:
        raise ValueError("cannot merge loader states saved with different data layouts")
    merged = {"format": STATE_FORMAT, "layout": dict(states[0].get("layout", {})), "streams": {}, "next_worker": {},
              "drains": []}
    for s in states:
        merged["streams"].update(s.get("streams", {}))
        merged["next_worker"].update(s.get("next_worker", {}))
        for i, drain in enumerate(s.get("drains", [])):  # every rank lists every drain, with its own streams
            if i == len(merged["drains"]):
                merged["drains"].append({"layout": drain["layout"], "stop": drain["stop"], "streams": {}})
            merged["drains"][i]["streams"].update(drain["streams"])
    return merged


# ----------------------------------------------------------------------------------------------- building


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int, split: str = "train",
                 epochs: Optional[int] = None, max_batches: Optional[int] = None,
                 encoders: Optional[Mapping[str, str]] = None, source: Optional[str] = None) -> Loader:
    """The loader of `split` ("train" or "val") for this rank.

    Pass the SAME `seed` on every rank: all ranks derive one shard order from it, which is what splits the data
    without overlap. `batch_size` is per rank. The train split is shuffled and endless (epochs=None) unless
    `epochs` says how many to run; the val split is one unshuffled pass per iteration, or exactly `max_batches`
    batches per rank (cycling through it as needed) so distributed ranks take the same number of steps.
    `encoders` ({"text_encoder": fingerprint, "autoencoder": fingerprint}) makes cached shards from other
    encoders an error (features.EncoderMismatch). With data.sources, the train split is their weighted mixture
    (endless whatever `epochs` says) and the val split reads every source's held-out data, or only that of the
    source named `source`. Shards must exist: see `ensure_shards`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    sources = resolve_sources(cfg, split)
    if source is not None:
        named = tuple(part for part in sources if part.name == source)
        if not named:
            raise ValueError(f"no data source named {source!r} has a {split} split (found: "
                             f"{', '.join(part.name for part in sources)})")
        sources = named
    urls = [u for part in sources for u in part.urls]
    train = split == "train"
    cached = detect_cached(urls, cfg.remote) if cfg.cached == "auto" else bool(cfg.cached)
    expect = dict(encoders) if encoders is not None else None
    if cached and expect is not None:
        header = read_cache_header(urls, cfg.remote)
        if header is not None:
            check_encoders(header.encoders, expect, urls[0])
    workers = max(1, cfg.num_workers)
    if train:
        run_epochs = epochs
    else:
        run_epochs = None if max_batches is not None else (epochs or 1)
    spec = StreamSpec(
        sources=sources,
        mixture=train and len(sources) > 1,
        seed=seed,
        num_streams=world_size * workers,
        batch_size=batch_size,
        buckets=tuple(loader_buckets(cfg)),
        channels=cfg.channels,
        cached=cached,
        masks=cfg.masks,
        alpha_masks=cfg.alpha_masks,
        shuffle=cfg.shuffle and train,
        shuffle_buffer=cfg.shuffle_buffer,
        resampled=cfg.resampled and train,
        drop_last=cfg.drop_last and train,
        epochs=run_epochs,
        max_pixels=cfg.max_image_pixels,
        max_member_bytes=cfg.max_member_bytes,
        expect_encoders=expect,
        policy=cfg.remote,
        paired=cfg.paired,
    )
    layout = {
        "shards": hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16],
        "holdout": ",".join(f"{part.holdout}:{part.holdout_fraction}" for part in sources),
        "sources": [[part.weight, part.caption_key] for part in sources] if spec.mixture else [],
        "seed": seed,
        "world_size": world_size,
        "num_workers": workers,
        "batch_size": batch_size,
        "buckets": [[b.height, b.width] for b in spec.buckets],
        "cached": cached,
        "shuffle": spec.shuffle,
        "shuffle_buffer": spec.shuffle_buffer,
        "resampled": spec.resampled,
        "drop_last": spec.drop_last,
    }
    if spec.paired:  # only then: the positions of unpaired runs saved before paired data existed stay exact
        layout["paired"] = True
    return Loader(spec, rank=rank, world_size=world_size, processes=cfg.num_workers,
                  prefetch_factor=cfg.prefetch_factor, resumable=train, max_batches=max_batches, layout=layout)


def loader_buckets(cfg: DataConfig) -> list[Bucket]:
    """The training shapes: the resolution itself, or the aspect buckets around its area."""
    height, width = cfg.size
    if cfg.buckets == 0:
        return [Bucket(height, width)]
    return make_buckets(height, width, cfg.buckets, max_aspect=cfg.bucket_max_aspect, multiple=cfg.bucket_multiple)
