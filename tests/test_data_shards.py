"""Shard discovery, splits, building missing shards, the recipe's data section, and untrusted tar input."""

from __future__ import annotations

import importlib.util
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowmatch.data import DataConfig, ensure_shards, expand_shards, resolve_split
from flowmatch.data.buckets import make_buckets, nearest_bucket
from flowmatch.data.tarstream import BadRecord, RawSample, read_shard

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "tiny-000000.tar.gz"


def touch_shards(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_committed_fixture_matches_the_script_that_made_it(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_shard", FIXTURES / "make_tiny_shard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    records = list(read_shard(str(FIXTURE)))
    expected = script.fixture_samples()
    assert [r.key for r in records] == [s["key"] for s in expected]
    for record, want in zip(records, expected):
        image = Image.open(io.BytesIO(record.files["png"]))
        assert image.size == want["size"] and image.getpixel((0, 0)) == want["rgb"]
        assert set(record.files) == {"png", *want["files"]}
    assert FIXTURE.stat().st_size < 4096
    # Rerunning the script gives the same samples (the PNG bytes themselves depend on the Pillow/zlib version).
    script.write(tmp_path / "again.tar.gz")
    again = list(read_shard(str(tmp_path / "again.tar.gz")))
    assert [(r.key, {k: v for k, v in r.files.items() if k != "png"}) for r in again] == [
        (r.key, {k: v for k, v in r.files.items() if k != "png"}) for r in records]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("channels", 4, "data.channels"),
        ("prepare", "mnist", "data.prepare"),
        ("cached", "yes", "data.cached"),
        ("cached", 1, "data.cached"),
        ("resolution", [8, 8, 8], "data.resolution"),
        ("holdout_fraction", 1.0, "data.holdout_fraction"),
        ("buckets", -1, "data.buckets"),
        ("shards", "", "data.shards"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value})


def test_config_resolution_forms():
    assert DataConfig(resolution=16).size == (16, 16)
    assert DataConfig(resolution=[8, 24]).size == (8, 24)


def test_patterns_expand_to_sorted_shards(tmp_path):
    touch_shards(tmp_path / "a", ["b-000001.tar", "b-000000.tar", "notes.txt", "c.tar.gz"])
    assert [Path(p).name for p in expand_shards(str(tmp_path / "a"))] == ["b-000000.tar", "b-000001.tar", "c.tar.gz"]
    assert len(expand_shards(str(tmp_path / "a" / "b-*.tar"))) == 2
    assert len(expand_shards(str(tmp_path / "a" / "b-{000000..000003}.tar"))) == 2  # missing ones dropped
    both = f"{tmp_path}/a/b-000000.tar::{tmp_path}/a/c.tar.gz"
    assert len(expand_shards(both)) == 2
    assert expand_shards("https://host/x-{0..2}.tar") == [f"https://host/x-{i}.tar" for i in range(3)]
    assert expand_shards("pipe:cat /data/x.tar") == ["pipe:cat /data/x.tar"]


def test_val_shards_are_never_trained_on(tmp_path):
    touch_shards(tmp_path, ["train-000000.tar", "train-000001.tar", "val-000000.tar"])
    cfg = DataConfig(shards=str(tmp_path), prepare="")
    assert [Path(u).name for u in resolve_split(cfg, "train").urls] == ["train-000000.tar", "train-000001.tar"]
    assert [Path(u).name for u in resolve_split(cfg, "val").urls] == ["val-000000.tar"]
    explicit = DataConfig(shards=str(tmp_path), val_shards=str(tmp_path / "train-000001.tar"), prepare="")
    assert [Path(u).name for u in resolve_split(explicit, "train").urls] == ["train-000000.tar"]


def test_missing_shards_without_builder_say_how_to_make_them(tmp_path):
    cfg = DataConfig(shards=str(tmp_path / "nothing"), prepare="")
    with pytest.raises(FileNotFoundError, match="flowmatch-data folder"):
        ensure_shards(cfg)


def test_ensure_shards_builds_digits_once(tmp_path, caplog):
    cfg = DataConfig(shards=str(tmp_path / "digits"), prepare="digits")
    with caplog.at_level(logging.WARNING, logger="flowmatch.data"):
        urls = ensure_shards(cfg)
    assert "building them" in caplog.text
    assert urls and all(Path(u).name.startswith("train-") for u in urls)
    assert any(Path(u).name.startswith("val-") for u in expand_shards(cfg.shards))
    assert not list(tmp_path.glob(".digits.building-*"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowmatch.data"):
        assert ensure_shards(cfg) == urls
    assert "building" not in caplog.text


def test_prepare_needs_a_directory_pattern(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        ensure_shards(DataConfig(shards=str(tmp_path / "x-*.tar"), prepare="digits"))


def tar_bytes(members: list[tuple[str, bytes]], *, symlink: str = "") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return raw.getvalue()


def test_unsafe_members_are_refused(tmp_path):
    shard = tmp_path / "x.tar"
    shard.write_bytes(tar_bytes(
        [("a.txt", b"ok"), ("../../etc/cron.txt", b"x"), ("/abs/path.txt", b"x"), ("b/../../c.txt", b"x"),
         ("d.txt", b"ok")],
        symlink="link.txt",
    ))
    records = list(read_shard(str(shard)))
    samples = [r.key for r in records if isinstance(r, RawSample)]
    bad = [(r.key, r.reason) for r in records if isinstance(r, BadRecord)]
    assert samples == ["a", "d"]
    assert bad == [
        ("../../etc/cron.txt", "unsafe member name"),
        ("/abs/path.txt", "unsafe member name"),
        ("b/../../c.txt", "unsafe member name"),
        ("link.txt", "not a regular file"),
    ]


def test_truncated_and_missing_shards_become_records(tmp_path):
    data = tar_bytes([(f"k{i}.txt", b"x" * 600) for i in range(4)])  # 512 header + 1024 data per member
    for cut in (2 * 1536 + 100, 2 * 1536):  # inside the third header, and exactly at it (tarfile calls that EOF)
        (tmp_path / "t.tar").write_bytes(data[:cut])
        records = list(read_shard(str(tmp_path / "t.tar")))
        # k1 may have lost members after the cut, so the sample in progress goes with it
        assert [r.key for r in records if isinstance(r, RawSample)] == ["k0"]
        assert [(r.key, r.reason) for r in records if isinstance(r, BadRecord)] == [
            ("k1", "truncated or corrupt shard")
        ]
    (tmp_path / "whole.tar").write_bytes(data)
    assert all(isinstance(r, RawSample) for r in read_shard(str(tmp_path / "whole.tar")))
    missing = list(read_shard(str(tmp_path / "absent.tar")))
    assert len(missing) == 1 and missing[0].reason == "unreadable shard"


def test_oversized_members_are_skipped_unread(tmp_path):
    (tmp_path / "big.tar").write_bytes(tar_bytes([("a.txt", b"x" * 5000), ("b.txt", b"y")]))
    records = list(read_shard(str(tmp_path / "big.tar"), max_member_bytes=1000))
    assert [r.reason for r in records if isinstance(r, BadRecord)] == ["oversized member"]
    assert [r.key for r in records if isinstance(r, RawSample)] == ["b"]


def test_buckets_keep_area_and_pick_nearest_aspect():
    buckets = make_buckets(256, 256, 5, max_aspect=2.0, multiple=16)
    assert len(buckets) == 5
    for b in buckets:
        assert b.height % 16 == 0 and b.width % 16 == 0
        assert abs(b.height * b.width / 256**2 - 1) < 0.15  # about equal token counts
    assert buckets[nearest_bucket(buckets, 512, 256)].aspect == pytest.approx(max(b.aspect for b in buckets))
    assert buckets[nearest_bucket(buckets, 300, 300)].aspect == pytest.approx(1.0)


def test_pixel_bound_is_checked_before_decoding():
    from flowmatch.data import decode

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(decode.BadSample, match="oversized image"):
        decode.decode_image(buffer.getvalue(), height=8, width=8, channels=1, max_pixels=10_000)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_tar_reader_agrees_with_tarfile(tmp_path, fmt, compression):
    long_dir = "d" * 120  # > 100 characters: ustar prefix field, GNU long-name entries or pax path records
    names = ["a.txt", f"{long_dir}/b.txt", f"{long_dir}/{'n' * 90}.json", "ünï.txt"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:2]  # ustar cannot hold the long file name or non-ASCII names
    path = tmp_path / f"x.tar{'.' + compression if compression else ''}"
    with tarfile.open(path, f"w:{compression}", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (700 + i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = list(read_shard(str(path)))
    assert all(isinstance(r, RawSample) for r in records)
    got = {f"{r.key}.{ext}": data for r in records for ext, data in r.files.items()}
    with tarfile.open(path) as tar:
        want = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == want


def test_corrupt_header_checksum_is_caught(tmp_path):
    data = bytearray(tar_bytes([("a.txt", b"x"), ("b.txt", b"y")]))
    data[1024 + 10] ^= 0x55  # inside the second member's name
    (tmp_path / "c.tar").write_bytes(bytes(data))
    records = list(read_shard(str(tmp_path / "c.tar")))
    assert [r.reason for r in records if isinstance(r, BadRecord)] == ["truncated or corrupt shard"]
    assert "checksum" in records[-1].detail
