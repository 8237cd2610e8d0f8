"""The shard loader: coverage across ranks and workers, exact resume, bad data, splits, cached features."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowmatch.conditioning import Conditioning
from flowmatch.data import DataConfig, EncoderMismatch, build_loader, features, merge_loader_states
from flowmatch.data.shardformat import ShardSink

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-000000.tar.gz"


def png(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: Path, counts: list[int], prefix: str = "train") -> list[str]:
    """Shards holding counts[i] samples each; key s{i}-{j}, pixel value (7 * index) % 256."""
    keys = []
    for i, n in enumerate(counts):
        with ShardSink(out, prefix=f"{prefix}{i:02d}", shard_size=n) as sink:
            for j in range(n):
                key = f"s{i}-{j:03d}"
                sink.write(key, {"png": png((7 * len(keys)) % 256), "txt": f"caption {key}"})
                keys.append(key)
    return keys


def cfg_for(shards: Path | str, **kw) -> DataConfig:
    base = dict(shards=str(shards), prepare="", resolution=8, channels=1, shuffle_buffer=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def take(loader, n: int) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_exactly_once_across_two_ranks_two_workers(tmp_path):
    keys = write_shards(tmp_path, [13, 9, 11, 7, 10])  # 5 uneven shards over 4 streams: one shard is shared
    cfg = cfg_for(tmp_path, num_workers=2)
    seen = Counter()
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, batch_size=4, seed=3, epochs=1)
        got = [k for b in loader for k in b.keys]
        per_rank.append(len(got))
        seen.update(got)
    assert seen == Counter(keys)  # every sample exactly once, none invented
    assert min(per_rank) > 0


def test_exactly_once_with_fewer_shards_than_streams():
    cfg = cfg_for(FIXTURE, channels=3, num_workers=2)
    seen = Counter()
    for rank in range(2):
        for batch in build_loader(cfg, rank=rank, world_size=2, batch_size=2, seed=0, epochs=2):
            seen.update(batch.keys)
    assert seen == Counter({f"tiny-{i:02d}": 2 for i in range(12)})  # once per epoch, two epochs


def test_resume_yields_exactly_the_remainder(tmp_path):
    write_shards(tmp_path, [10, 9, 8])
    cfg = cfg_for(tmp_path, num_workers=2)
    first = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=5)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # plain types: survives any checkpoint format
    reference = [next(it) for _ in range(10)]  # crosses into the next epoch (27 samples = 7-8 batches per epoch)
    del it

    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    again = take(resumed, 10)
    assert [b.keys for b in again] == [b.keys for b in reference]
    for a, b in zip(again, reference):
        torch.testing.assert_close(a.images, b.images)
        assert a.captions == b.captions


def test_buckets_make_uniform_batches_and_resume(tmp_path):
    cfg = cfg_for(FIXTURE, channels=3, buckets=3, bucket_multiple=4, resolution=8)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=1)
    batches = take(loader, 12)
    shapes = {tuple(b.images.shape[2:]) for b in batches}
    assert shapes == {(8, 8), (4, 12), (12, 4)}  # (h, w): square, wide 16x8 images, tall 8x16 images
    for b in batches:
        expected = {"tiny-00": (8, 8), "tiny-01": (4, 12), "tiny-02": (12, 4)}
        for key in b.keys:
            assert tuple(b.images.shape[2:]) == expected[f"tiny-0{int(key[-2:]) % 3}"]
    first = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=1)
    partial = take(first, 4)
    saved = first.state_dict()
    resumed = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=1)
    resumed.load_state_dict(saved)
    assert [b.keys for b in take(resumed, 8)] == [b.keys for b in batches[4:12]]
    assert [b.keys for b in partial] == [b.keys for b in batches[:4]]


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    write_shards(tmp_path, [12, 12, 12])
    cfg = cfg_for(tmp_path)

    def order(seed):
        loader = build_loader(cfg, rank=0, world_size=1, batch_size=36, seed=seed)
        return [b.keys for b in take(loader, 2)]

    a, b = order(0), order(1)
    assert a == order(0)
    assert a != b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])  # epoch 2 reshuffles the same samples


def write_bad_shards(tmp_path: Path) -> tuple[list[str], Path]:
    """One shard with a corrupt image, a caption-less sample and a path-traversal member; one truncated shard."""
    good = []
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for j in range(6):
            add(f"ok-{j}.png", png(10 * j))
            add(f"ok-{j}.txt", f"good {j}".encode())
            good.append(f"ok-{j}")
        add("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        add("broken.txt", b"a corrupt image")
        add("nocaption.png", png(99))
        add("../evil.txt", b"escape attempt")
    (tmp_path / "train-000000.tar").write_bytes(raw.getvalue())
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for j in range(8):
            for ext, data in (("png", png(j)), ("txt", f"t {j}".encode())):
                info = tarfile.TarInfo(f"trunc-{j}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = whole.getvalue()
    cut = 5 * 2 * 1024 + 700  # inside the 6th sample's image member: the first five samples survive
    (tmp_path / "train-000001.tar").write_bytes(data[:cut])
    good += [f"trunc-{j}" for j in range(5)]
    return good, tmp_path


def test_bad_data_is_skipped_counted_and_training_continues(tmp_path):
    good, shards = write_bad_shards(tmp_path)
    loader = build_loader(cfg_for(shards, num_workers=2), rank=0, world_size=1, batch_size=3, seed=0, epochs=1)
    keys = [k for b in loader for k in b.keys]  # counts come back from two worker processes
    assert sorted(keys) == sorted(good)
    stats = loader.stats
    assert stats.reasons == {
        "undecodable image": 1,
        "missing caption": 1,
        "unsafe member name": 1,
        "truncated or corrupt shard": 1,
    }
    assert loader.bad_samples == 4 and stats.samples == len(good)


def test_bad_counters_survive_resume(tmp_path, caplog):
    _, shards = write_bad_shards(tmp_path)
    cfg = cfg_for(shards)
    a = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=0)
    with caplog.at_level("WARNING", logger="flowmatch.data"):
        full = take(a, 8)  # two epochs: every bad record counted once per epoch
    assert "skipped" in caplog.text and "unsafe member name" in caplog.text
    b = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=0)
    take(b, 3)
    c = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=0)
    c.load_state_dict(b.state_dict())
    rest = take(c, 5)
    assert [x.keys for x in rest] == [x.keys for x in full[3:]]
    assert c.stats == a.stats


def test_resampled_stream_is_seeded_and_resumable(tmp_path):
    write_shards(tmp_path, [6, 6, 6, 6, 6])
    cfg = cfg_for(tmp_path, resampled=True, num_workers=2)
    one = [b.keys for b in take(build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=9), 9)]
    assert one == [b.keys for b in take(build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=9), 9)]
    other = [b.keys for b in take(build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=10), 9)]
    assert one != other
    loader = build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=9)
    take(loader, 4)
    resumed = build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=9)
    resumed.load_state_dict(loader.state_dict())
    assert [b.keys for b in take(resumed, 5)] == one[4:]


def test_val_split_is_held_out_and_max_batches_equalizes_ranks(tmp_path):
    train = write_shards(tmp_path, [10, 10], prefix="train")
    val = write_shards(tmp_path, [5], prefix="val-")
    cfg = cfg_for(tmp_path)
    train_loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, epochs=1)
    assert sum(len(b) for b in train_loader) == len(train)
    val_loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, split="val")
    first = [b.keys for b in val_loader]
    assert sum(map(len, first)) == len(val) and first == [b.keys for b in val_loader]  # fixed, fresh each pass
    counts = [len(list(build_loader(cfg, rank=r, world_size=3, batch_size=2, seed=0, split="val", max_batches=4)))
              for r in range(3)]
    assert counts == [4, 4, 4]


def test_holdout_fraction_partitions_keys(tmp_path):
    keys = write_shards(tmp_path, [40, 40])
    cfg = cfg_for(tmp_path, holdout_fraction=0.25)
    train = {k for b in build_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0, epochs=1) for k in b.keys}
    val = {k for b in build_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0, split="val") for k in b.keys}
    assert train.isdisjoint(val) and train | val == set(keys)
    assert 5 <= len(val) <= 35


def test_no_val_data_is_a_clear_error(tmp_path):
    write_shards(tmp_path, [4])
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_loader(cfg_for(tmp_path), rank=0, world_size=1, batch_size=2, seed=0, split="val")


def test_pixels_are_converted_and_scaled_to_minus_one_one():
    cfg = cfg_for(FIXTURE, channels=3, shuffle=False)
    batch = next(iter(build_loader(cfg, rank=0, world_size=1, batch_size=12, seed=0, epochs=1)))
    assert batch.images.shape == (12, 3, 8, 8)
    i = batch.keys.index("tiny-04")
    expected = torch.tensor([20 * 4, 255 - 20 * 4, 128]) / 127.5 - 1
    torch.testing.assert_close(batch.images[i, :, 3, 3], expected)
    assert batch.captions[batch.keys.index("tiny-10")] == "tiny sample 10"  # caption from .json only
    gray = next(iter(build_loader(cfg_for(FIXTURE, shuffle=False), rank=0, world_size=1, batch_size=12, seed=0)))
    assert gray.images.shape == (12, 1, 8, 8)


def test_state_from_another_layout_is_refused_or_skips_to_next_epoch(tmp_path):
    write_shards(tmp_path, [8, 8])
    cfg = cfg_for(tmp_path)
    a = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    take(a, 2)
    other = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=1)  # (another batch size resumes exactly)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(a.state_dict())
    other.load_state_dict(a.state_dict(), strict=False)
    assert other.stats.epoch == 1


def test_merged_state_serves_every_rank(tmp_path):
    write_shards(tmp_path, [9, 9, 9, 9])
    cfg = cfg_for(tmp_path, num_workers=0)
    loaders = [build_loader(cfg, rank=r, world_size=2, batch_size=3, seed=2) for r in range(2)]
    for loader in loaders:
        take(loader, 2)
    merged = merge_loader_states([loader.state_dict() for loader in loaders])
    expected = take(loaders[1], 3)
    resumed = build_loader(cfg, rank=1, world_size=2, batch_size=3, seed=2)
    resumed.load_state_dict(merged)
    assert [b.keys for b in take(resumed, 3)] == [b.keys for b in expected]
    lonely = build_loader(cfg, rank=1, world_size=2, batch_size=3, seed=2)
    with pytest.raises(ValueError, match="no position"):
        lonely.load_state_dict(loaders[0].state_dict())


ENCODERS = {"text_encoder": "fake-text:1", "autoencoder": "fake-ae:1"}


def write_cached(out: Path, n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    with ShardSink(out, prefix="train", shard_size=n) as sink:
        for i in range(n):
            tokens = 2 + i % 4
            blob = features.encode(torch.randn(4, 2, 2, generator=gen), torch.randn(tokens, 6, generator=gen),
                                   torch.randn(5, generator=gen), dtype="bf16", encoders=ENCODERS)
            sink.write(f"c{i:02d}", {features.EXT: blob, "txt": f"cached {i}", "json": json.dumps({"label": i})})


def test_cached_shards_give_latents_and_padded_text(tmp_path):
    write_cached(tmp_path, 10)
    loader = build_loader(cfg_for(tmp_path, num_workers=2), rank=0, world_size=1, batch_size=4, seed=0, epochs=1,
                          encoders=ENCODERS)
    assert loader.cached
    batches = list(loader)
    assert sum(len(b) for b in batches) == 10
    for b in batches:
        assert b.images is None and b.latents.shape[1:] == (4, 2, 2) and b.latents.dtype == torch.float32
        lengths = torch.tensor([2 + int(k[1:]) % 4 for k in b.keys])
        assert torch.equal(b.text.mask.sum(1), lengths)
        assert b.text.hidden.shape == (len(b), int(lengths.max()), 6) and b.text.pooled.shape == (len(b), 5)
        assert torch.all(b.text.hidden[~b.text.mask] == 0)
        assert [m["label"] for m in b.meta] == [int(k[1:]) for k in b.keys]
        moved = b.to("cpu")  # the one conditioning type, moved as a whole
        assert isinstance(moved.text, Conditioning) and torch.equal(moved.text.hidden, b.text.hidden)


def test_cached_features_from_other_encoders_are_refused(tmp_path):
    write_cached(tmp_path, 3)
    other = {**ENCODERS, "autoencoder": "vae:sd3"}
    with pytest.raises(EncoderMismatch, match="autoencoder"):
        build_loader(cfg_for(tmp_path), rank=0, world_size=1, batch_size=2, seed=0, encoders=other)


def test_shards_that_never_yield_a_batch_fail_loudly_instead_of_hanging(tmp_path):
    with ShardSink(tmp_path, prefix="train") as sink:
        for i in range(3):
            sink.write(f"k{i}", {"png": b"\x89PNG\r\n\x1a\nnot an image", "txt": "broken"})
    loader = build_loader(cfg_for(tmp_path), rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="made no batch"):
        next(iter(loader))


def damaged_blobs(blob: bytes) -> dict[str, tuple[str, bytes]]:
    """Ways a cached-feature blob breaks, by the loader's reason: a bad header is found when batching (peek), damage
    inside a readable header's tensor data when decoding."""
    (length,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + length])
    header["hidden"]["data_offsets"] = header["latents"]["data_offsets"]  # overlapping tensors: safetensors refuses
    overlapping = json.dumps(header).encode()
    data = blob[8 + length:]
    return {
        "cut-header": ("unreadable features", blob[:20]),
        "garbage": ("unreadable features", b"\x07" * 64),
        "cut-data": ("unreadable features", blob[:-16]),  # header intact, data shorter than it says
        "overlap": ("corrupt features", struct.pack("<Q", len(overlapping)) + overlapping + data),
        "nan-data": ("non-finite features", blob[:8 + length] + b"\xff" * len(data)),  # 0xffff is a bf16 NaN
    }


def test_damaged_cached_features_are_skipped_and_counted_by_reason(tmp_path):
    gen = torch.Generator().manual_seed(0)
    damaged, good = {}, []
    with ShardSink(tmp_path, prefix="train") as sink:
        for i in range(8):
            blob = features.encode(torch.randn(4, 2, 2, generator=gen), torch.randn(3, 6, generator=gen),
                                   torch.randn(5, generator=gen), dtype="bf16", encoders=ENCODERS)
            sink.write(f"good{i}", {features.EXT: blob, "txt": f"cached {i}"})
            good.append(f"good{i}")
            if i == 1:  # the bad ones sit among the good ones
                damaged = damaged_blobs(blob)
                for key, (_, broken) in damaged.items():
                    sink.write(key, {features.EXT: broken, "txt": "broken"})
    loader = build_loader(cfg_for(tmp_path, shuffle=False), rank=0, world_size=1, batch_size=4, seed=0, epochs=1,
                          encoders=ENCODERS)
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == good
    for b in batches:
        assert b.latents.shape == (len(b), 4, 2, 2) and torch.isfinite(b.latents).all()
        assert b.text.hidden.shape == (len(b), 3, 6) and torch.isfinite(b.text.hidden).all()
    assert loader.stats.reasons == dict(Counter(reason for reason, _ in damaged.values()))
    assert loader.stats.samples == 8 and loader.stats.bad == 5
