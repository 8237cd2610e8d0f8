"""flowmatch-data: folder, digits, jsonl, inspect and verify."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import digits
from data_tools.cli import main
from data_tools.folder import build_folder
from data_tools.jsonl import build_jsonl
from data_tools.summary import inspect_shards
from data_tools.verify import verify_pattern
from flowmatch.data import DataConfig, build_loader, expand_shards
from flowmatch.data.shardformat import ShardSink, safe_key
from flowmatch.data.tarstream import RawSample, read_shard


def image_bytes(fmt: str, size=(10, 6), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub.dir").mkdir(parents=True)
    (src / "a.png").write_bytes(image_bytes("PNG"))
    (src / "a.txt").write_text("a red rectangle\n")
    (src / "b.JPG").write_bytes(image_bytes("JPEG"))
    (src / "b.json").write_text(json.dumps({"caption": "a jpeg", "source_id": 7}))
    (src / "sub.dir" / "c.webp").write_bytes(image_bytes("WEBP"))
    (src / "sub.dir" / "c.txt").write_text("a webp in a dotted folder")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "broken.txt").write_text("never decodes")
    (src / "lonely.png").write_bytes(image_bytes("PNG"))
    (src / "orphan.txt").write_text("no image for me")
    (src / "blank.png").write_bytes(image_bytes("PNG"))
    (src / "blank.txt").write_text("   \n")
    (src / "big.png").write_bytes(image_bytes("PNG", size=(300, 300)))
    (src / "big.txt").write_text("too many pixels for the test bound")
    (src / "notes.md").write_text("# not data")
    return src


def test_folder_tool_skips_bad_entries_and_reports_them(messy_folder, tmp_path):
    out = tmp_path / "out"
    report = build_folder(messy_folder, out, shard_size=2, max_pixels=50_000)
    assert report.written == 3
    reasons = {s.source: s.reason for s in report.skipped}
    assert reasons["broken.png"].startswith("undecodable image")
    assert reasons["lonely.png"] == "image without caption"
    assert reasons["orphan.txt"] == "caption without image"
    assert reasons["blank.png"] == "empty caption"
    assert reasons["big.png"].startswith("oversized image")
    assert reasons["notes.md"] == "unsupported file type"
    saved = json.loads((out / "report.json").read_text())
    assert saved["written"] == 3 and len(saved["skipped"]) == 6
    samples = [r for u in expand_shards(str(out)) for r in read_shard(u)]
    assert all(isinstance(r, RawSample) for r in samples) and len(expand_shards(str(out))) == 2
    by_key = {r.key: r for r in samples}
    assert set(by_key) == {"a", "b", "sub_dir_c"}
    assert set(by_key["b"].files) == {"jpg", "txt", "json"} and by_key["b"].files["txt"] == b"a jpeg"
    assert json.loads(by_key["b"].files["json"]) == {"source": "b.JPG", "caption": "a jpeg", "source_id": 7}
    assert by_key["a"].files["png"] == (messy_folder / "a.png").read_bytes()  # stored as is, not re-encoded
    loader = build_loader(DataConfig(shards=str(out), prepare="", resolution=8, channels=3, num_workers=0), rank=0,
                          world_size=1, batch_size=8, seed=0, epochs=1)
    assert sorted(k for b in loader for k in b.keys) == ["a", "b", "sub_dir_c"]


def test_folder_command_succeeds_and_lists_bad_entries(messy_folder, tmp_path, capsys):
    assert main(["folder", str(messy_folder), str(tmp_path / "out"), "--shard-size", "10"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples in 1 shards" in printed  # big.png fits the default pixel bound
    assert "lonely.png: image without caption" in printed and "orphan.txt: caption without image" in printed
    assert main(["folder", str(messy_folder), str(tmp_path / "out")]) == 2  # refuses to mix with old shards
    assert "--overwrite" in capsys.readouterr().err


def test_safe_keys_have_no_dots_or_slashes():
    assert safe_key("../a b/c.d") == "a_b_c_d"
    with pytest.raises(ValueError):
        ShardSink("/tmp/never", prefix="../x")


def test_digits_tool_writes_every_digit_with_its_label(digit_shards):
    records = {u: [r for r in read_shard(u)] for u in expand_shards(str(digit_shards))}
    samples = [r for rs in records.values() for r in rs]
    assert all(isinstance(r, RawSample) for r in samples) and len(samples) == 1797
    images, labels = digits.load_digits_arrays()
    val = [r for u, rs in records.items() if Path(u).name.startswith("val-") for r in rs]
    assert 0.07 < len(val) / 1797 < 0.13
    templates_used = Counter()
    for r in samples:
        meta = json.loads(r.files["json"])
        index, label, caption = meta["index"], meta["label"], r.files["txt"].decode()
        assert label == labels[index] and meta["caption"] == caption
        assert caption in digits.captions_for(label)
        templates_used[digits.captions_for(label).index(caption)] += 1
        assert (r in val) == digits.is_val(index)
        pixels = np.asarray(Image.open(io.BytesIO(r.files["png"])))
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, (images[index] * 255 + 8) // 16)
    assert len(templates_used) == len(digits.caption_templates()) >= 12


def test_digit_captions_mix_words_and_numerals_and_heldout_prompts_are_unseen():
    templates = digits.caption_templates()
    assert sum("{w}" in t for t in templates) >= 4 and sum("{n}" in t for t in templates) >= 4
    for d in range(10):
        train = set(digits.captions_for(d))
        held = digits.heldout_prompts(d)
        assert held and train.isdisjoint(held)
        assert all(re.search(rf"\b({d}|{digits.DIGIT_WORDS[d]})\b", c) for c in [*train, *held])
    assert digits.DIGIT_WORDS[7] == "seven"


def test_digits_train_and_val_loaders_are_disjoint(digit_shards):
    cfg = DataConfig(shards=str(digit_shards), prepare="", resolution=8, channels=1, num_workers=0)
    train = {k for b in build_loader(cfg, rank=0, world_size=1, batch_size=256, seed=0, epochs=1) for k in b.keys}
    val_batches = list(build_loader(cfg, rank=0, world_size=1, batch_size=256, seed=0, split="val"))
    val = {k for b in val_batches for k in b.keys}
    assert len(train) + len(val) == 1797 and train.isdisjoint(val)
    assert {m["label"] for b in val_batches for m in b.meta} == set(range(10))


def test_jsonl_tool_reads_paths_and_reports_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "img" / "y.jpg").write_bytes(image_bytes("JPEG"))
    rows = [
        {"image": "img/x.png", "caption": "first", "score": 0.5},
        {"path": "img/y.jpg", "text": "second"},
        {"image": "img/missing.png", "caption": "gone"},
        {"caption": "no image"},
        {"image": "img/x.png"},
        {"image": "ftp://host/z.png", "caption": "bad scheme"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    report = build_jsonl(tmp_path / "rows.jsonl", tmp_path / "out")
    assert report.written == 2
    reasons = {s.source: s.reason for s in report.skipped}
    assert sorted(reasons) == [f"rows.jsonl:{n}" for n in (3, 4, 5, 6, 7)]
    assert reasons["rows.jsonl:3"].startswith("unreadable image") and reasons["rows.jsonl:7"].startswith("not JSON")
    assert reasons["rows.jsonl:4"] == "row without image" and reasons["rows.jsonl:5"] == "row without caption"
    assert "only http(s) URLs" in reasons["rows.jsonl:6"]
    samples = [r for u in expand_shards(str(tmp_path / "out")) for r in read_shard(u)]
    assert [r.files["txt"] for r in samples] == [b"first", b"second"]
    assert json.loads(samples[0].files["json"]) == {"source": "img/x.png", "score": 0.5}


def test_inspect_counts_and_writes_a_preview(digit_shards, tmp_path):
    summary = inspect_shards(str(digit_shards), preview=tmp_path / "grid.png", preview_count=16)
    assert summary.shards == len(expand_shards(str(digit_shards))) and summary.samples == 1797
    assert summary.extensions == {"json+png+txt": 1797}
    assert summary.caption_words["min"] >= 1 and summary.caption_words["max"] <= 12
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 64 * 3 and grid.size[0] == grid.size[1]


def test_verify_lists_corrupt_members(tmp_path, capsys):
    with ShardSink(tmp_path, prefix="good") as sink:
        sink.write("fine", {"png": image_bytes("PNG"), "txt": "ok"})
    assert main(["verify", str(tmp_path)]) == 0
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in [("x.png", b"garbage"), ("x.txt", b"\xff\xfe bad utf8"), ("y.json", b"{"),
                           ("../z.txt", b"escape")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bad-000000.tar").write_bytes(raw.getvalue())
    report = verify_pattern(str(tmp_path))
    text = "\n".join(report.problems)
    assert "x.png: undecodable image" in text and "x.txt: UnicodeDecodeError" in text
    assert "y.json: JSONDecodeError" in text and "../z.txt: unsafe member name" in text
    assert main(["verify", str(tmp_path)]) == 1
    assert "problems" in capsys.readouterr().out
