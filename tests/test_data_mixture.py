"""Weighted mixtures of data sources: proportions, exact resume, captions per source, validation per source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowmatch.config import load_recipe
from flowmatch.data import DataConfig, build_loader
from flowmatch.data.config import SourceConfig
from flowmatch.data.shardformat import ShardSink
from flowmatch.errors import RecipeError
from tests.test_data_loader import take
from tests.test_data_resume import png


def write_source(out: Path, prefix: str, shards: int, per_shard: int, caption_member: str = "txt",
                 val: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        with ShardSink(out, prefix=f"train{i}", shard_size=per_shard) as sink:
            for j in range(per_shard):
                key = f"{prefix}{i}-{j}"
                sink.write(key, {"png": png(j, (8, 8)), caption_member: f"{prefix} caption {j}",
                                 "json": json.dumps({"source": prefix})})
    if val:
        with ShardSink(out, prefix="val", shard_size=val) as sink:
            for j in range(val):
                sink.write(f"{prefix}val-{j}", {"png": png(j, (8, 8)), caption_member: f"{prefix} held out {j}"})


def mixture(tmp_path: Path, **kw) -> DataConfig:
    write_source(tmp_path / "a", "a", 3, 10, val=4)  # 30 samples
    write_source(tmp_path / "b", "b", 2, 7, caption_member="caption", val=3)  # 14 samples, captions in .caption
    sources = [SourceConfig(str(tmp_path / "a"), weight=3.0, name="big"),
               SourceConfig(str(tmp_path / "b"), weight=1.0, caption_key="caption", name="small")]
    base = dict(prepare="", resolution=8, channels=1, shuffle_buffer=6, num_workers=0, sources=sources)
    return DataConfig(**{**base, **kw})


def test_mixture_proportions_follow_the_weights(tmp_path):
    cfg = mixture(tmp_path)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=20, seed=0)
    batches = take(loader, 100)  # 2,000 samples; the small source cycles through ~36 of its epochs
    keys = [k for b in batches for k in b.keys]
    share = sum(k.startswith("b") for k in keys) / len(keys)
    # expected 0.25; the binomial standard deviation at n = 2,000 is 0.0097: 4 of them
    assert abs(share - 0.25) < 0.04
    assert loader.stats.sources == {"big": len(keys) - sum(k.startswith("b") for k in keys),
                                    "small": sum(k.startswith("b") for k in keys)}
    # each source's caption comes from its own caption_key; its .json rides along in the batch
    for b in batches[:5]:
        for key, caption, meta in zip(b.keys, b.captions, b.meta):
            assert caption.startswith(key[0]) and meta == {"source": key[0]}
    other = [k for b in take(build_loader(cfg, rank=0, world_size=1, batch_size=20, seed=1), 100) for k in b.keys]
    assert other != keys  # the sampler is seeded


def test_mixture_resume_is_exact(tmp_path):
    cfg = mixture(tmp_path, num_workers=2)
    reference = [b.keys for b in take(build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=3), 24)]
    first = build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=3)
    take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, rank=1, world_size=2, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [b.keys for b in take(resumed, 13)] == reference[11:]
    assert sum(resumed.stats.sources.values()) == sum(len(k) for k in reference)


def test_mixture_validation_reads_each_source_split(tmp_path):
    cfg = mixture(tmp_path)
    val = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, split="val")
    keys = sorted(k for b in val for k in b.keys)
    assert keys == sorted([f"aval-{j}" for j in range(4)] + [f"bval-{j}" for j in range(3)])
    assert val.stats.sources == {"big": 4, "small": 3}
    train = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    assert not any("val" in k for b in take(train, 20) for k in b.keys)


def test_sources_in_a_recipe(tmp_path):
    recipe = load_recipe(None, ['data.sources=[{"shards": "a/", "weight": 2, "caption_key": "caption"}, '
                                '{"shards": "b/"}]'])
    assert [s.weight for s in recipe.data.sources] == [2.0, 1.0] and recipe.data.sources[0].caption_key == "caption"
    with pytest.raises(RecipeError, match="sources"):
        load_recipe(None, ['data.sources=[{"shards": "a/", "wieght": 2}]'])
    with pytest.raises(RecipeError, match="data.shards and data.sources"):
        load_recipe(None, ['data.shards=x/', 'data.sources=[{"shards": "a/"}]'])


@pytest.mark.slow  # a real training run
def test_training_logs_per_source_counts_and_validation(tmp_path):
    from flowmatch.training import train
    from tests.test_train import read_metrics, tiny_recipe

    mixture(tmp_path)  # writes the two sources
    sources = [{"shards": str(tmp_path / "a"), "weight": 3, "name": "big"},
               {"shards": str(tmp_path / "b"), "weight": 1, "caption_key": "caption", "name": "small"}]
    recipe = tiny_recipe(tmp_path / "run", "data/shards", **{"data.prepare": "", "data.sources": sources,
                                                             "train.max_steps": 2})
    train(recipe)
    metrics = read_metrics(tmp_path / "run")
    logged = [m for m in metrics if "samples_big" in m]
    assert logged and logged[-1]["samples_big"] + logged[-1]["samples_small"] == 2 * 8
    assert any("val_loss_big" in m and "val_loss_small" in m for m in metrics)
