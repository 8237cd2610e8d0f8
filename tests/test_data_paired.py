"""Paired (editing) samples: the reference keys, the loader's grouping and skipping, cached reference latents and
the shard writers' reference field."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from data_tools.folder import build_folder
from data_tools.jsonl import build_jsonl
from flowmatch.data import DataConfig, build_loader, features
from flowmatch.data.pixels import pixels_to_model
from flowmatch.data.shardformat import ShardSink, reference_ext, reference_members
from flowmatch.data.tarstream import RawSample, read_shard


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def cfg_for(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), prepare="", resolution=8, channels=1, shuffle_buffer=8, num_workers=0,
                paired=True)
    return DataConfig(**{**base, **kw})


def test_reference_members_are_numbered_in_order_and_a_gap_is_found():
    assert reference_ext(0, "png") == "ref.png" and reference_ext(2, "jpg") == "ref_2.jpg"
    assert reference_members(["txt", "png", "ref_1.jpg", "ref.png"]) == (["ref.png", "ref_1.jpg"], False)
    assert reference_members(["png", "txt"]) == ([], False)
    assert reference_members(["png", "ref.png", "ref_2.png"]) == (["ref.png"], True)  # ref_1 is missing
    assert reference_members(["ref_1.png"]) == ([], True)
    assert reference_members(["ref.txt", "ref.json"]) == ([], False)  # not images


def write_paired(out: Path) -> dict[str, int]:
    """Samples with 0-2 references: target value v, reference i value v + 1 + i. Returns good key -> count."""
    good: dict[str, int] = {}
    with ShardSink(out, prefix="train", shard_size=100) as sink:
        for j in range(24):
            v, refs = 10 * j, (1, 2)[j % 2]
            key = f"k{j:02d}"
            files = {"png": png(v), "txt": f"add {j}"}
            if j in (3, 8):
                refs = 0  # no reference at all
            elif j == 5:
                files["ref_1.png"] = png(v + 2)  # ref_1 without ref: a gap
                refs = 0
            elif j == 7:
                files["ref.png"] = b"not a png"
                refs = 0
            elif j == 9:
                files["ref.png"], files["ref_2.png"] = png(v + 1), png(v + 3)  # ref_1 is missing
                refs = 0
            for i in range(refs):
                files[reference_ext(i, "png")] = png(v + 1 + i)
            sink.write(key, files)
            if refs:
                good[key] = refs
    return good


def test_paired_loader_groups_by_reference_count_and_skips_missing_references(tmp_path):
    good = write_paired(tmp_path)
    loader = build_loader(cfg_for(tmp_path), rank=0, world_size=1, batch_size=4, seed=0, epochs=1)
    seen = Counter()
    for batch in loader:
        assert batch.ref_images is not None
        b, r = batch.ref_images.shape[:2]
        assert batch.ref_images.shape == (b, r, 1, 8, 8) and b == len(batch)
        for key, image, refs in zip(batch.keys, batch.images, batch.ref_images):
            assert r == good[key]  # grouped: every sample of the batch has this many references
            v = int(key[1:]) * 10
            assert torch.equal(image, pixels_to_model(torch.full((1, 8, 8), v, dtype=torch.uint8)))
            for i in range(r):  # the reference i of this very sample, not the target or a neighbour's
                assert torch.equal(refs[i], pixels_to_model(torch.full((1, 8, 8), v + 1 + i, dtype=torch.uint8)))
        seen.update(batch.keys)
    assert seen == Counter(list(good))  # each good sample once, none of the bad
    assert loader.stats.reasons == {"missing reference": 4, "undecodable reference": 1}


def test_unpaired_loader_ignores_reference_members(tmp_path):
    write_paired(tmp_path)
    loader = build_loader(cfg_for(tmp_path, paired=False), rank=0, world_size=1, batch_size=24, seed=0, epochs=1)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 24 and all(b.ref_images is None for b in batches)


def cached_blob(value: float, refs: int) -> bytes:
    references = torch.full((refs, 4, 2, 2), value + 1) if refs else None
    return features.encode(torch.full((4, 2, 2), value), torch.zeros(3, 6), torch.zeros(5), dtype="fp32",
                           encoders={"autoencoder": "ae", "text_encoder": "te"}, references=references)


def test_reference_latents_round_trip_and_a_paired_cache_needs_them(tmp_path):
    blob = cached_blob(2.0, 2)
    assert features.read_header(blob).reference_shape == (2, 4, 2, 2)
    assert torch.equal(features.decode(blob).references, torch.full((2, 4, 2, 2), 3.0))
    assert features.read_header(cached_blob(2.0, 0)).reference_shape == ()
    with ShardSink(tmp_path, prefix="train", shard_size=100) as sink:
        for j in range(7):
            sink.write(f"c{j}", {features.EXT: cached_blob(float(j), 0 if j == 4 else 1 + j % 2), "txt": "x"})
    loader = build_loader(cfg_for(tmp_path), rank=0, world_size=1, batch_size=8, seed=0, epochs=1)
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == ["c0", "c1", "c2", "c3", "c5", "c6"]
    for batch in batches:
        assert batch.ref_latents.shape[:2] == (len(batch), 1 + int(batch.keys[0][1:]) % 2)
        for latents, refs in zip(batch.latents, batch.ref_latents):
            assert torch.equal(refs, (latents + 1).expand_as(refs))
    assert loader.stats.reasons == {"missing reference": 1}


def members(out: Path) -> dict[str, RawSample]:
    return {r.key: r for shard in sorted(out.glob("*.tar")) for r in read_shard(str(shard))}


def test_folder_tool_stores_references_named_by_the_json(tmp_path):
    src = tmp_path / "src"
    (src / "refs").mkdir(parents=True)
    for name, value in (("a", 10), ("b", 20), ("c", 30), ("refs/r1", 40), ("refs/r2", 50)):
        (src / f"{name}.png").write_bytes(png(value))
    (src / "a.json").write_text(json.dumps({"caption": "add one", "reference": "refs/r1.png"}))
    (src / "b.json").write_text(json.dumps({"caption": "add two", "reference": ["refs/r2.png", "refs/r1.png"]}))
    (src / "c.json").write_text(json.dumps({"caption": "add three", "reference": "refs/gone.png"}))
    report = build_folder(src, tmp_path / "out")
    samples = members(tmp_path / "out")
    assert sorted(samples) == ["a", "b"]
    assert samples["a"].files["ref.png"] == png(40) and "ref_1.png" not in samples["a"].files
    assert samples["b"].files["ref.png"] == png(50) and samples["b"].files["ref_1.png"] == png(40)
    assert [(s.source, s.reason.split(" (")[0]) for s in report.skipped] == [("c.png", "unreadable reference")]


def test_jsonl_tool_stores_references_and_skips_rows_whose_reference_is_missing(tmp_path):
    for name, value in (("t", 10), ("r", 20)):
        (tmp_path / f"{name}.png").write_bytes(png(value))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    rows = [{"image": "t.png", "caption": "add one", "reference": "r.png"},
            {"image": "t.png", "caption": "add two", "reference": "nowhere.png"},
            {"image": "t.png", "caption": "add three", "reference": ["r.png", "bad.png"]},
            {"image": "t.png", "caption": "add four", "reference": 7}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = build_jsonl(tmp_path / "rows.jsonl", tmp_path / "out")
    samples = members(tmp_path / "out")
    assert list(samples) == ["row-000000001"] and samples["row-000000001"].files["ref.png"] == png(20)
    reasons = {s.source: s.reason for s in report.skipped}
    assert reasons["rows.jsonl:2"].startswith("unreadable reference")
    assert reasons["rows.jsonl:3"].startswith("reference 1: undecodable image")
    assert reasons["rows.jsonl:4"].startswith("bad reference field")

