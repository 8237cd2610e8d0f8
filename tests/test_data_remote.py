"""Remote shards for real: a local HTTP server (with injected 500s and dropped connections) and pipe: commands."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import pytest

from data_tools.serve import ShardServer
from flowmatch.data import DataConfig, build_loader
from flowmatch.data.opener import SHARD_FAILED, RetryPolicy, ShardUnavailable, open_shard
from flowmatch.data.shardformat import ShardSink
from tests.test_data_loader import take
from tests.test_data_resume import png

FAST = {"retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.02, "timeout_s": 5.0}


def write_shards(out: Path, shards: int, per_shard: int) -> dict[str, list[str]]:
    """{file name: keys}"""
    names = {}
    for i in range(shards):
        with ShardSink(out, prefix=f"train{i}", shard_size=per_shard) as sink:
            for j in range(per_shard):
                sink.write(f"k{i}-{j}", {"png": png(i * 10 + j, (8, 8)), "txt": f"caption {i} {j}"})
        names[f"train{i}-000000.tar"] = [f"k{i}-{j}" for j in range(per_shard)]
    return names


def cfg_for(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, prepare="", resolution=8, channels=1, shuffle_buffer=8, num_workers=0,
                remote=RetryPolicy(**FAST))
    return DataConfig(**{**base, **kw})


def test_http_shards_recover_from_transient_failures(tmp_path):
    names = write_shards(tmp_path, 4, 6)
    # every file: its first request answers 500, its second drops the connection halfway through the body
    with ShardServer(tmp_path, fail_first=1, drop_first=1) as server:
        cfg = cfg_for(server.url("train{0..3}-000000.tar"))
        loader = build_loader(cfg, rank=0, world_size=1, batch_size=5, seed=0, epochs=1)
        keys = [k for b in loader for k in b.keys]
        assert Counter(keys) == Counter(k for ks in names.values() for k in ks)
        assert loader.stats.failed_shards == 0 and loader.stats.bad == 0
        # the dropped body was continued with a range request from the byte reached, not from the start
        assert any(start > 0 for _, start in server.requests)


def test_http_shards_that_keep_failing_are_counted_and_skipped(tmp_path):
    names = write_shards(tmp_path, 4, 6)
    with ShardServer(tmp_path, broken={"train2-000000.tar"}) as server:
        cfg = cfg_for(server.url("train{0..3}-000000.tar"))
        loader = build_loader(cfg, rank=0, world_size=1, batch_size=5, seed=0, epochs=1)
        keys = [k for b in loader for k in b.keys]
        assert sorted(keys) == sorted(k for name, ks in names.items() if name != "train2-000000.tar" for k in ks)
        assert loader.stats.failed_shards == 1 and loader.stats.reasons == {SHARD_FAILED: 1}
        attempts = [path for path, _ in server.requests if path == "train2-000000.tar"]
        assert len(attempts) == FAST["retries"] + 1


def test_all_shards_failing_is_an_error_not_a_hang(tmp_path):
    write_shards(tmp_path, 2, 3)
    with ShardServer(tmp_path, broken={"train0-000000.tar", "train1-000000.tar"}) as server:
        with pytest.raises(RuntimeError, match="2 of 2 shards could not be read"):  # found when detecting the format
            build_loader(cfg_for(server.url("train{0..1}-000000.tar")), rank=0, world_size=1, batch_size=2, seed=0)
        loader = build_loader(cfg_for(server.url("train{0..1}-000000.tar"), cached=False), rank=0, world_size=1,
                              batch_size=2, seed=0)
        with pytest.raises(RuntimeError, match="made no batch in a whole epoch: 2 of 2 shards could not be read"):
            next(iter(loader))


def test_http_resume_uses_range_requests_and_is_exact(tmp_path):
    write_shards(tmp_path, 3, 10)
    with ShardServer(tmp_path) as server:
        cfg = cfg_for(server.url("train{0..2}-000000.tar"), num_workers=2)
        first = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=2)
        take(first, 4)
        state = json.loads(json.dumps(first.state_dict()))
        expected = [b.keys for b in take(first, 6)]
        server.requests.clear()
        resumed = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=2)
        resumed.load_state_dict(state)
        assert [b.keys for b in take(resumed, 6)] == expected
        assert any(start > 0 for _, start in server.requests)


def test_pipe_commands_retry_and_count(tmp_path):
    names = write_shards(tmp_path, 2, 4)
    flag = tmp_path / "failed-once"
    good = tmp_path / "train0-000000.tar"
    # fails (exit 1, no output) the first time it runs, then streams the shard
    flaky = f"pipe:sh -c {shlex.quote(f'if [ -e {flag} ]; then cat {good}; else touch {flag}; exit 1; fi')}"
    gone = f"pipe:cat {tmp_path / 'absent.tar'}"
    cfg = cfg_for(f"{flaky}::{gone}::{tmp_path / 'train1-000000.tar'}")
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=3, seed=0, epochs=1)
    keys = sorted(k for b in loader for k in b.keys)
    assert keys == sorted(names["train0-000000.tar"] + names["train1-000000.tar"])
    assert loader.stats.reasons == {SHARD_FAILED: 1} and flag.exists()


def test_permanent_http_errors_are_not_retried(tmp_path):
    with ShardServer(tmp_path) as server:
        with pytest.raises(ShardUnavailable, match="404"):
            open_shard(server.url("missing.tar"), policy=RetryPolicy(**FAST))
        assert server.requests == [("missing.tar", -1)]  # one request, no retries


@pytest.mark.slow  # a real training run
def test_training_reads_shards_over_http(tmp_path, digit_shards):
    from flowmatch.training import train
    from tests.test_train import read_metrics, tiny_recipe

    with ShardServer(digit_shards, fail_first=1) as server:
        shards = "::".join(server.url(p.name) for p in sorted(Path(digit_shards).iterdir()) if p.suffix == ".tar")
        recipe = tiny_recipe(tmp_path / "run", shards, **{"data.remote.backoff_s": 0.01, "train.max_steps": 2})
        summary = train(recipe)
        assert summary.final_step == 2
        metrics = [m for m in read_metrics(tmp_path / "run") if "bad_samples" in m]
        assert metrics and all(m["bad_samples"] == 0 and m["failed_shards"] == 0 for m in metrics)
        served = {path for path, _ in server.requests}
        assert any(p.startswith("train-") for p in served) and any(p.startswith("val-") for p in served)
