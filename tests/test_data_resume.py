"""Resume without replay: a saved position names the records in flight, and resuming reads only those shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowmatch.data import DataConfig, build_loader, merge_loader_states
from flowmatch.data import plan as plan_module
from flowmatch.data.shardformat import ShardSink
from flowmatch.data.tarstream import RawSample, read_shard
from tests.test_data_loader import take

SIZES = [(8, 8), (16, 8), (8, 16)]  # (width, height): square, wide, tall -> three buckets


def png(value: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: Path, shards: int, per_shard: int) -> list[str]:
    keys = []
    for i in range(shards):
        with ShardSink(out, prefix=f"train{i:02d}", shard_size=per_shard) as sink:
            for j in range(per_shard):
                key = f"s{i}-{j:02d}"
                sink.write(key, {"png": png(len(keys) % 251, SIZES[len(keys) % 3]), "txt": f"caption {key}"})
                keys.append(key)
    return keys


def cfg_for(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), prepare="", resolution=8, channels=1, buckets=3, bucket_multiple=4,
                shuffle_buffer=16, num_workers=2)
    return DataConfig(**{**base, **kw})


def test_resume_is_exact_over_two_ranks_two_workers_with_buckets_and_a_buffer_larger_than_a_shard(tmp_path):
    keys = write_shards(tmp_path, shards=9, per_shard=7)  # buffer 16 > 7 samples per shard; 9 shards, 4 streams
    cfg = cfg_for(tmp_path)
    # exactly once per epoch over both ranks, buckets and all
    seen = Counter(k for rank in range(2)
                   for b in build_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=4, epochs=1)
                   for k in b.keys)
    assert seen == Counter(keys)
    states = []
    for rank in range(2):
        reference = take(build_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=4), 30)  # about 2 epochs
        for cut in (3, 9, 17):  # early, mid-epoch, into the second epoch
            first = build_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=4)
            head = take(first, cut)
            assert [b.keys for b in head] == [b.keys for b in reference[:cut]]
            state = json.loads(json.dumps(first.state_dict()))  # plain types
            states.append(state)
            resumed = build_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=4)
            resumed.load_state_dict(state)
            rest = take(resumed, 30 - cut)
            assert [b.keys for b in rest] == [b.keys for b in reference[cut:]], (rank, cut)
            for a, b in zip(rest, reference[cut:]):
                assert torch.equal(a.images, b.images) and a.captions == b.captions
            assert resumed.stats.samples == sum(len(b) for b in reference)
    # positions held a buffer of more than a shard's samples, and partial bucket groups
    details = [d["detail"] for state in states for d in state["streams"].values()]
    assert max(len(d["buffer"]) // 3 for d in details) > 7
    assert any(len(d["groups"]["pending"]) > 1 for d in details)


def test_resume_opens_only_the_shards_its_position_names(tmp_path, monkeypatch):
    write_shards(tmp_path, shards=12, per_shard=6)
    cfg = cfg_for(tmp_path, num_workers=0, buckets=0, shuffle_buffer=8)
    first = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=1)
    take(first, 14)  # 14 x 4 = 56 of the epoch's 72 samples: most shards are done
    state = first.state_dict()
    detail = state["streams"]["0"]["detail"]
    urls = list(first.urls)
    named = {urls[u] for u in detail["buffer"][0::3]}
    named |= {urls[u] for refs in detail["groups"]["pending"] for u in refs[0::3]}
    opened: list[tuple[str, int]] = []
    real = plan_module.read_shard

    def spy(url, **kw):
        opened.append((url, kw.get("start", 0)))
        return real(url, **kw)

    monkeypatch.setattr(plan_module, "read_shard", spy)
    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    again = take(resumed, 2)
    # the shards the buffer and the partial groups name (each at the offsets named), and the shard being read (and
    # at most its successor): not the 9 or so shards the epoch finished before the position was saved
    reading = {u for u, _ in opened} - named
    assert len(reading) <= 2, opened
    assert any(start > 0 for _, start in opened)  # seeked, not read from the start
    monkeypatch.setattr(plan_module, "read_shard", real)
    assert [b.keys for b in again] == [b.keys for b in take(first, 2)]


def test_records_can_be_read_back_alone_from_their_place(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [("a.txt", b"1"), ("../bad.txt", b"x"), ("a.png", b"2"), (f"{'l' * 120}.txt", b"3"),
                              ("b.txt", b"4"), ("b.txt", b"dup"), ("c.txt", b"5")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for suffix, raw in ((".tar", data.getvalue()), (".tar.gz", None)):
        path = tmp_path / f"x{suffix}"
        if raw is None:
            import gzip

            raw = gzip.compress(data.getvalue())
        path.write_bytes(raw)
        records = list(read_shard(str(path)))
        assert [r.key if isinstance(r, RawSample) else r.reason for r in records] == [
            "unsafe member name", "a", "l" * 120, "duplicate member", "b", "c"]
        for i, record in enumerate(records):
            again = list(read_shard(str(path), start=record.offset, skip=record.skip))
            assert [type(r).__name__ + getattr(r, "key", "") for r in again] == \
                [type(r).__name__ + getattr(r, "key", "") for r in records[i:]]
            assert again[0] == record


def test_state_is_small_and_mergeable(tmp_path):
    write_shards(tmp_path, shards=4, per_shard=30)
    cfg = cfg_for(tmp_path, num_workers=0, buckets=0, shuffle_buffer=50)
    loaders = [build_loader(cfg, rank=r, world_size=2, batch_size=5, seed=0) for r in range(2)]
    for loader in loaders:
        take(loader, 4)
    merged = merge_loader_states([loader.state_dict() for loader in loaders])
    size = len(json.dumps(merged["streams"]["1"]))
    assert size < 50 * 3 * 8 + 1000  # three small integers per buffered sample, plus a few hundred bytes
    expected = take(loaders[1], 3)
    resumed = build_loader(cfg, rank=1, world_size=2, batch_size=5, seed=0)
    resumed.load_state_dict(merged)
    assert [b.keys for b in take(resumed, 3)] == [b.keys for b in expected]


@pytest.mark.parametrize("fmt", ["flowmatch-loader-1"])
def test_positions_of_the_older_format_start_the_next_epoch(tmp_path, fmt):
    write_shards(tmp_path, shards=2, per_shard=4)
    cfg = cfg_for(tmp_path, num_workers=0, buckets=0)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0)
    old = {"format": fmt, "layout": dict(loader.layout),
           "streams": {"0": {"epoch": 3, "batch": 2, "samples": 40, "bad": {}}}, "next_worker": {"0": 0}}
    with pytest.raises(ValueError, match="older loader"):
        loader.load_state_dict(old)
    loader.load_state_dict(old, strict=False)
    assert loader.stats.epoch == 4


def _run_ranks(cfg: DataConfig, world: int, state: dict | None, batches: int | None) -> tuple[list[str], dict]:
    """`batches` batches from each of `world` ranks (all of them when None), resumed from `state`; the keys handed
    out and the merged state after them."""
    loaders = [build_loader(cfg, rank=r, world_size=world, batch_size=6 // world, seed=3, epochs=2)
               for r in range(world)]
    keys = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
        keys += [k for b in (take(loader, batches) if batches else loader) for k in b.keys]
    return keys, merge_loader_states([loader.state_dict() for loader in loaders])


def test_resume_on_2_then_1_then_3_ranks_hands_out_every_sample_once_per_epoch(tmp_path, caplog):
    keys = write_shards(tmp_path, shards=7, per_shard=5)
    cfg = cfg_for(tmp_path, num_workers=0)
    whole, _ = _run_ranks(cfg, 2, None, None)
    assert Counter(whole) == Counter(keys * 2)  # the uninterrupted run: two epochs, each sample once in each
    # 2 ranks x 2 workers, then 1 rank x 2 workers (half the streams), then 3 ranks x 1 worker with half the
    # shuffle buffer: every change is elastic.
    first, state = _run_ranks(cfg_for(tmp_path, num_workers=2), 2, None, 3)
    second, state = _run_ranks(cfg_for(tmp_path, num_workers=2), 1, state, 4)
    assert len(state["drains"]) == 1 and state["drains"][0]["stop"] == 1
    third, _ = _run_ranks(cfg_for(tmp_path, num_workers=0, shuffle_buffer=8), 3, state, None)
    assert len(first) == 2 * 3 * 3 and second  # (an epoch's end flushes partial batches: sizes vary there)
    counts = Counter(first + second + third)
    duplicates = sum(n - 2 for n in counts.values() if n > 2)
    missing = sum(2 - counts.get(k, 0) for k in keys if counts.get(k, 0) < 2)
    assert (duplicates, missing) == (0, 0)
    assert counts == Counter(whole)
    assert "no resume can follow exactly" not in caplog.text


def test_a_changed_seed_cannot_resume_exactly_and_says_what_it_skips(tmp_path, caplog):
    write_shards(tmp_path, shards=3, per_shard=5)
    _, state = _run_ranks(cfg_for(tmp_path, num_workers=0), 1, None, 1)
    loader = build_loader(cfg_for(tmp_path, num_workers=0), rank=0, world_size=1, batch_size=6, seed=4)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict(state)
    loader.load_state_dict(state, strict=False)
    assert loader.stats.epoch == 1
    (position,) = state["streams"].values()
    held = len(position["detail"]["buffer"]) // 3 + sum(len(g) // 3 for g in position["detail"]["groups"]["pending"])
    assert held > 0 and f"skipped, {held} held in the saved buffers" in caplog.text


def test_resume_in_the_middle_of_a_shard_hands_out_the_next_record_once(tmp_path):
    # A buffer smaller than a shard saves places inside shards (offset > 0), which must point past the records
    # already handed out: a place one record short replays a sample, one record long skips one.
    keys = write_shards(tmp_path, shards=2, per_shard=20)
    cfg = cfg_for(tmp_path, shuffle_buffer=2, num_workers=1, buckets=1)
    reference = take(build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=4, epochs=1), 20)
    assert Counter(k for b in reference for k in b.keys) == Counter(keys)
    for cut in (3, 7, 12):
        first = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=4, epochs=1)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        places = [p for s in state["streams"].values() for p in s["detail"]["places"]]
        assert any(p[2] > 0 or p[3] > 0 for p in places), places  # inside a shard, not at its start
        resumed = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=4, epochs=1)
        resumed.load_state_dict(state)
        rest = take(resumed, 20 - cut)
        assert [b.keys for b in rest] == [b.keys for b in reference[cut:]], cut
