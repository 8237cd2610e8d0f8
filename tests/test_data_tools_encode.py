"""flowmatch-data encode: cached latents and text embeddings, resumable, refused when the encoders differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_tools import encode as encode_tool
from data_tools.encode import EncodeSettings, encode_shards
from flowmatch.data import DataConfig, EncoderMismatch, build_loader, features, read_cache_info
from flowmatch.data.shardformat import ShardSink
from flowmatch.data.tarstream import RawSample, read_shard

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "digits.yaml")
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-000000.tar.gz"
# The fixture is RGB with mixed shapes: encode it as 3-channel 8x8 images through the identity autoencoder.
SETTINGS = EncodeSettings(RECIPE, ("data.channels=3",), batch_size=5, dtype="fp16", device="cpu")


def varied_captions(out: Path) -> Path:
    """The fixture's images with captions of different token counts (so padding has to be cut off)."""
    with ShardSink(out, prefix="tiny") as sink:
        for r in read_shard(str(FIXTURE)):
            files = {k: v for k, v in r.files.items() if k != "txt"}
            files["txt"] = f"tiny sample {r.key[-2:]}" + " with a few more words" * (int(r.key[-2:]) % 3)
            sink.write(r.key, files)
    return out / "tiny-000000.tar"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    src = varied_captions(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("cached")
    report = encode_shards(str(src), out, SETTINGS, progress=False)
    assert report.encoded == 1 and report.samples == 12 and report.bad == {}
    return out


@pytest.fixture(scope="module")
def encoders():
    from flowmatch.config import load_recipe
    from flowmatch.encoders.frozen import FrozenEncoders

    recipe = load_recipe(RECIPE, list(SETTINGS.overrides))
    frozen = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels)
    return frozen.text.encoders["text_encoder"], frozen.autoencoder


def test_encode_stores_the_encoders_outputs(encoded, encoders):
    text, auto = encoders
    samples = [r for r in read_shard(str(encoded / "tiny-000000.tar")) if isinstance(r, RawSample)]
    assert len(samples) == 12
    raw = {r.key: r for r in read_shard(str(FIXTURE)) if isinstance(r, RawSample)}
    direct = text.encode([s.files["txt"].decode() for s in samples])
    assert len(set(direct.mask.sum(1).tolist())) == 3  # three caption lengths: padding had to be cut off
    for i, sample in enumerate(samples):
        header = features.read_header(sample.files[features.EXT])
        assert header.encoders == {"text_encoder": text.fingerprint(), "autoencoder": auto.fingerprint()}
        assert header.dtype == "fp16" and header.latent_shape == (3, 8, 8)
        stored = features.decode(sample.files[features.EXT])
        tokens = int(direct.mask[i].sum())
        assert stored.hidden.shape[0] == tokens  # cut to the caption's real tokens, no padding stored
        torch.testing.assert_close(stored.hidden.float(), direct.hidden[i, :tokens], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(stored.pooled.float(), direct.pooled[i], atol=2e-3, rtol=2e-3)
        if "json" in raw[sample.key].files:
            assert sample.files["json"] == raw[sample.key].files["json"]
    square = next(s for s in samples if s.key == "tiny-03")  # 8x8 source: no resize, exact pixels
    latents = features.decode(square.files[features.EXT]).latents.float()
    expected = torch.tensor([60, 195, 128]) / 127.5 - 1
    torch.testing.assert_close(latents[:, 4, 4], expected, atol=1e-3, rtol=0)
    manifest = json.loads((encoded / "features.json").read_text())
    assert manifest["shards"] == {"tiny-000000.tar": {"samples": 12, "bad": {}}}


def test_training_reads_cached_shards_and_refuses_other_encoders(encoded, encoders):
    text, auto = encoders
    fingerprints = {"text_encoder": text.fingerprint(), "autoencoder": auto.fingerprint()}
    cfg = DataConfig(shards=str(encoded), prepare="", resolution=8, channels=3, num_workers=0)
    assert read_cache_info(cfg).encoders == fingerprints
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, epochs=1, encoders=fingerprints)
    batches = list(loader)
    assert loader.cached and sum(len(b) for b in batches) == 12
    assert all(b.images is None and b.latents.shape[1:] == (3, 8, 8) and b.text.mask.any(1).all() for b in batches)
    with pytest.raises(EncoderMismatch, match="text_encoder"):
        build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, encoders={**fingerprints, "text_encoder": "t5"})


def test_training_steps_on_cached_shards(encoded, tmp_path, monkeypatch, capsys):
    """Also: with cached train and val features the trainer frees the text encoders after encoding the sampling
    prompts (bug caught: the encoders kept in memory for a whole cached run), and says which loss masks it uses
    (bug caught: an RGBA dataset masked, or not, without a word)."""
    from flowmatch.config import load_recipe
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.training import train

    released = []
    real = FrozenEncoders.release

    def record(self, keep):
        released.append(list(keep))
        real(self, keep)
        assert all(enc.model is None for enc in self.text.encoders.values())

    monkeypatch.setattr(FrozenEncoders, "release", record)

    overrides = {"run_dir": str(tmp_path / "run"), "data.shards": str(encoded), "data.channels": 3,
                 "model.preset": "tiny", "train.max_steps": 2, "train.batch_size": 4, "optim.warmup_steps": 1,
                 "data.num_workers": 0, "logging.tensorboard": False, "logging.progress": False,
                 "sampling.per_prompt": 1, "sampling.steps": 2, "flow.caption_dropout": 0.5}
    recipe = load_recipe(RECIPE, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    summary = train(recipe)  # batches carry the loader's Conditioning into encode_batch and caption dropout
    assert summary.final_step == 2 and summary.skipped_steps == 0
    assert "loss masks: each sample's mask.png (NAME.mask.png), alpha channels are not masks" in capsys.readouterr().out
    assert released == [recipe.sampling.prompts]
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # the sample grid still drawn, from the kept prompts


def test_freed_text_encoders_answer_the_kept_captions_only():
    from flowmatch.config import load_recipe
    from flowmatch.encoders.frozen import FrozenEncoders

    recipe = load_recipe(RECIPE, [])
    frozen = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels)
    prompts = ["a handwritten 3", "the digit seven, written by hand"]
    before, null = frozen.encode_text(prompts), frozen.null()
    frozen.release(prompts)
    assert frozen.text.encoders["text_encoder"].model is None
    after = frozen.encode_text(prompts)
    torch.testing.assert_close(after.hidden, before.hidden, rtol=0, atol=1e-6)
    assert torch.equal(after.mask, before.mask) and torch.equal(frozen.null().hidden, null.hidden)
    with pytest.raises(RuntimeError, match="'a handwritten 4' was not encoded"):
        frozen.encode_text(["a handwritten 4"])


def test_encode_resumes_after_an_interruption(tmp_path, monkeypatch):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("a-000000.tar.gz", "b-000000.tar.gz"):
        shutil.copy(FIXTURE, src / name)
    out = tmp_path / "out"
    real = encode_tool.encode_shard
    calls = []

    def crash_on_second(enc, url, target, expected=None):
        calls.append(url)
        if len(calls) == 2:
            target.with_name(target.name + ".partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(enc, url, target, expected)

    monkeypatch.setattr(encode_tool, "encode_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        encode_shards(str(src), out, SETTINGS, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["a-000000.tar"]
    monkeypatch.setattr(encode_tool, "encode_shard", real)
    report = encode_shards(str(src), out, SETTINGS, progress=False)
    assert (report.encoded, report.already_done, report.samples) == (1, 1, 12)
    assert sorted(p.name for p in out.glob("*.tar")) == ["a-000000.tar", "b-000000.tar"]
    assert not list(out.glob("*.partial"))
    again = encode_shards(str(src), out, SETTINGS, progress=False)
    assert (again.encoded, again.already_done) == (0, 2)


def test_encode_refuses_to_mix_encoders_in_one_folder(encoded, tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    manifest = json.loads((encoded / "features.json").read_text())
    manifest["encoders"] = {"text_encoder": "other", "autoencoder": "other"}
    manifest["shards"] = {}
    (out / "features.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="other encoders"):
        encode_shards(str(FIXTURE), out, SETTINGS, progress=False)
    assert not list(out.glob("*.tar"))


@pytest.mark.slow
def test_encode_in_parallel_processes(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("a-000000.tar.gz", "b-000000.tar.gz"):
        shutil.copy(FIXTURE, src / name)
    report = encode_shards(str(src), tmp_path / "out", SETTINGS, processes=2, progress=False)
    assert (report.encoded, report.samples) == (2, 24)
    cfg = DataConfig(shards=str(tmp_path / "out"), prepare="", resolution=8, channels=3, num_workers=0)
    keys = [k for b in build_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0, epochs=1) for k in b.keys]
    assert len(keys) == 24


def test_several_encoders_are_cached_each_under_its_name_and_combined_on_load(tiny_sd3_pipeline, tmp_path):
    """SD3's three encoders: each one's output stored under its name (fp32 here, to compare exactly), re-padded
    and combined on load into what the encoders give directly."""
    import dataclasses

    from flowmatch.config import load_recipe
    from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
    from flowmatch.encoders.frozen import FrozenEncoders

    configs = encoder_configs_from_pipeline(tiny_sd3_pipeline)
    overrides = ("data.channels=3", "data.resolution=16",
                 f"text_encoders={json.dumps(dataclasses.asdict(configs.text_encoders))}",
                 f"autoencoder={json.dumps(dataclasses.asdict(configs.autoencoder))}")
    out = tmp_path / "cached"
    report = encode_shards(str(FIXTURE), out, EncodeSettings(RECIPE, overrides, batch_size=5, dtype="fp32",
                                                            device="cpu"), progress=False)
    assert report.samples == 12 and report.bad == {}
    recipe = load_recipe(RECIPE, list(overrides))
    frozen = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=3)
    sample = next(r for r in read_shard(str(out / "tiny-000000.tar")) if isinstance(r, RawSample))
    header = features.read_header(sample.files[features.EXT])
    assert sorted(header.parts) == ["clip_g", "clip_l", "t5"]
    assert header.encoders == frozen.fingerprints() and "text_encoder.t5" in header.encoders
    stored = features.decode(sample.files[features.EXT])
    assert stored.parts["clip_g"][0].shape == (77, 48) and stored.parts["t5"][0].shape == (256, 96)

    cfg = DataConfig(shards=str(out), prepare="", resolution=16, channels=3, num_workers=0)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, epochs=1, encoders=frozen.fingerprints())
    batch = next(iter(loader))
    assert batch.text is None and set(batch.text_parts) == {"clip_l", "clip_g", "t5"}
    _, cond = frozen.encode_batch(batch)
    direct = frozen.encode_text(batch.captions)
    torch.testing.assert_close(cond.hidden, direct.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, direct.pooled, rtol=0, atol=1e-6)
    other = {**frozen.fingerprints(), "text_encoder.t5": "t5:elsewhere"}
    with pytest.raises(EncoderMismatch, match="text_encoder.t5"):
        build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, encoders=other)


def test_encode_with_text_quant_stores_int8_text_that_decodes_close(tmp_path, encoders):
    """Bug caught: --text-quant / data.cache_text_quant not reaching the feature writer (the cache then stays
    bf16/fp16 at twice the size)."""
    from dataclasses import replace

    from data_tools.cli import main as data_cli

    text, _ = encoders
    src = varied_captions(tmp_path / "raw")
    data_cli(["encode", str(src), str(tmp_path / "int8"), "--recipe", RECIPE, "--set", "data.channels=3",
              "--dtype", "fp16", "--device", "cpu", "--text-quant", "int8", "--no-progress"])
    samples = [r for r in read_shard(str(tmp_path / "int8" / "tiny-000000.tar")) if isinstance(r, RawSample)]
    direct = text.encode([s.files["txt"].decode() for s in samples])
    for i, sample in enumerate(samples):
        assert features.read_header(sample.files[features.EXT]).text_dtype == "int8"
        stored = features.decode(sample.files[features.EXT]).hidden
        tokens = int(direct.mask[i].sum())
        scale = direct.hidden[i, :tokens].abs().amax(dim=-1, keepdim=True) / 127
        assert ((stored - direct.hidden[i, :tokens]).abs() <= scale * 0.5 + 2e-3).all()
    # The cache the trainer builds (data.cache) takes the same setting from the recipe.
    from flowmatch.config import load_recipe
    from flowmatch.encoders.cache import ensure_cache
    from flowmatch.encoders.frozen import FrozenEncoders

    recipe = load_recipe(RECIPE, ["data.channels=3"])
    data = replace(recipe.data, shards=str(src), cache=str(tmp_path / "trainer-cache"), cache_text_quant="fp8")
    ensure_cache(data, FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=3), progress=False)
    first = next(r for r in read_shard(str(tmp_path / "trainer-cache" / "tiny-000000.tar")) if isinstance(r, RawSample))
    assert features.read_header(first.files[features.EXT]).text_dtype == "fp8"
    with pytest.raises(ValueError, match="data.cache_text_quant"):
        DataConfig(shards=str(src), cache_text_quant="int4")


def test_ranks_encode_their_shares_and_the_last_merges_a_manifest_like_one_process(tmp_path, monkeypatch):
    src = tmp_path / "raw"
    src.mkdir()
    names = ("a-000000.tar.gz", "b-000000.tar.gz", "c-000000.tar.gz")
    for name in names:
        shutil.copy(FIXTURE, src / name)
    alone = encode_shards(str(src), tmp_path / "alone", SETTINGS, progress=False)
    assert alone.encoded == 3
    out = tmp_path / "ranks"
    real, seen = encode_tool.encode_shard, []

    def note(enc, url, target, expected=None):
        seen.append(Path(url).name)
        return real(enc, url, target, expected)

    monkeypatch.setattr(encode_tool, "encode_shard", note)
    # Rank 1 of 2 takes the second shard only and, ending first, leaves its part: no manifest yet.
    first = encode_shards(str(src), out, SETTINGS, progress=False, rank=1, world_size=2)
    assert (first.encoded, seen) == (1, ["b-000000.tar.gz"])
    assert not (out / "features.json").exists() and (out / "features.json.part-1-of-2").is_file()
    # A rank 0 that stops after its first shard: its part names that shard alone.
    monkeypatch.setattr(encode_tool, "encode_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
                        if len(seen) == 2 else note(*a))
    with pytest.raises(KeyboardInterrupt):
        encode_shards(str(src), out, SETTINGS, progress=False, rank=0, world_size=2)
    assert seen == ["b-000000.tar.gz", "a-000000.tar.gz"]
    # Resumed on one process: only the missing shard is encoded, then the parts are merged and removed.
    monkeypatch.setattr(encode_tool, "encode_shard", note)
    resumed = encode_shards(str(src), out, SETTINGS, progress=False)
    assert (resumed.encoded, resumed.already_done, seen[2:]) == (1, 2, ["c-000000.tar.gz"])
    assert not list(out.glob("features.json.*"))
    for name in ("features.json", "a-000000.tar", "b-000000.tar", "c-000000.tar"):
        assert (out / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
