"""The shard format's one writer (deterministic, atomic, checked keys and sizes) and the pixel range."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.data import decode, shardformat
from flowmatch.data.pixels import PIXEL_LEVEL_SCALE, model_to_unit, pixels_to_model, unit_to_pixels
from flowmatch.data.shardformat import ShardFile, ShardSink, check_key, safe_key
from flowmatch.data.tarstream import RawSample, read_shard


def write_samples(path, samples) -> bytes:
    with ShardFile(path) as shard:
        for key, files in samples:
            shard.write(key, files)
    return path.read_bytes()


SAMPLES = [("k0", {"txt": "zero", "json": b'{"a": 1}'}), ("dir/k1", {"txt": "one", "cls": b"7"})]


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_writing_twice_gives_the_same_bytes_and_the_reader_gives_the_samples_back(tmp_path, name):
    first = write_samples(tmp_path / name, SAMPLES)
    (tmp_path / name).unlink()
    assert write_samples(tmp_path / name, SAMPLES) == first
    if name.endswith(".gz"):
        assert first[:2] == b"\x1f\x8b" and struct.unpack("<I", first[4:8]) == (0,)  # no gzip time stamp
        first = gzip.decompress(first)
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k0.json", "k0.txt", "dir/k1.cls", "dir/k1.txt"]  # by extension
    assert {(m.mtime, m.uname, m.mode) for m in members} == {(shardformat.FIXED_MTIME, "bigdata", 0o444)}
    records = list(read_shard(str(tmp_path / name)))
    assert [(r.key, r.files) for r in records] == [
        (key, {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}) for key, files in SAMPLES]


def test_a_shard_appears_only_when_complete(tmp_path):
    path = tmp_path / "x.tar"
    with ShardFile(path) as shard:
        shard.write("a", {"txt": "a"})
        assert not path.exists() and shard.partial.exists()
    assert path.exists() and not shard.partial.exists()
    with pytest.raises(RuntimeError):
        with ShardFile(tmp_path / "y.tar") as shard:
            shard.write("a", {"txt": "a"})
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]


@pytest.mark.parametrize("key", ["a", "s0-001", "dir/abc", "dir.v2/abc", "a b", "000123"])
def test_keys_the_writer_accepts_read_back_as_themselves(tmp_path, key):
    write_samples(tmp_path / "k.tar", [(key, {"txt": "x"})])
    assert [r.key for r in read_shard(str(tmp_path / "k.tar"))] == [key]


@pytest.mark.parametrize("key", ["a.b", "../x", "/abs", "a//b", "a/", "", "__meta__", "x/__index__", "a\\b", "a\nb"])
def test_keys_that_would_not_read_back_or_are_unsafe_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="sample key"):
        write_samples(tmp_path / "k.tar", [(key, {"txt": "x"})])
    check_key(safe_key(key))  # what safe_key makes of it is writable


def test_bad_extensions_and_oversized_members_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bad extension"):
        write_samples(tmp_path / "e.tar", [("a", {"JPG": b"x"})])
    monkeypatch.setattr(shardformat, "MAX_MEMBER_BYTES", 10)
    with pytest.raises(ValueError, match="over the"):
        write_samples(tmp_path / "o.tar", [("a", {"txt": b"x" * 11})])
    with pytest.raises(ValueError, match=".tar"):
        ShardFile(tmp_path / "z.zip")


def test_shard_sink_numbers_shards_and_never_mixes_two_runs(tmp_path):
    with ShardSink(tmp_path, prefix="train", shard_size=2) as sink:
        for i in range(5):
            sink.write(f"k{i}", {"txt": str(i)})
    assert [p.name for p in sink.paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [len(list(read_shard(str(p)))) for p in sink.paths] == [2, 2, 1] and sink.count == 5
    with pytest.raises(FileExistsError, match="--overwrite"):
        ShardSink(tmp_path, prefix="train")
    with ShardSink(tmp_path, prefix="train", overwrite=True):
        pass
    assert list(tmp_path.iterdir()) == []  # old shards deleted, an empty run writes none
    with pytest.raises(ValueError, match="prefix"):
        ShardSink(tmp_path, prefix="../x")


def test_every_8_bit_level_round_trips_through_the_model_range():
    levels = torch.arange(256, dtype=torch.uint8)
    x = pixels_to_model(levels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.allclose(x[1] - x[0], torch.tensor(1 / PIXEL_LEVEL_SCALE))
    assert torch.equal(unit_to_pixels(model_to_unit(x)), levels)
    assert torch.equal(unit_to_pixels(torch.tensor([-0.2, 1.3])), torch.tensor([0, 255], dtype=torch.uint8))


def test_the_loader_decodes_pixels_into_the_model_range():
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 51, np.uint8)).save(buffer, format="PNG")
    image = decode.decode_image(buffer.getvalue(), height=4, width=4, channels=1, max_pixels=100)
    assert torch.allclose(image, torch.full((1, 4, 4), 51 / 127.5 - 1))
    sample = RawSample("k", "u", {"png": buffer.getvalue(), "txt": b"c"})
    assert decode.peek_raw(sample, max_pixels=100, need_size=True).size == (4, 4)
    # Transparent pixels are composited on white, whether the alpha is a channel or a palette entry (bug caught:
    # a transparency kind not recognised, its black colour values kept).
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    for transparent in (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), Image.new("LA", (4, 4), (0, 0)), palette):
        buffer = io.BytesIO()
        transparent.save(buffer, format="PNG", **({"transparency": 0} if transparent.mode == "P" else {}))
        image = decode.decode_image(buffer.getvalue(), height=4, width=4, channels=3, max_pixels=100)
        assert torch.equal(image, torch.ones(3, 4, 4)), transparent.mode
