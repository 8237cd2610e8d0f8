"""A tiny train -> checkpoint -> resume -> generate run on CPU, in one process, through the real trainer."""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flowmatch
from flowmatch.checkpoint import read_meta
from flowmatch.cli import main as cli_main
from flowmatch.config import load_recipe
from flowmatch.training import train
from flowmatch.training.loop import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits.yaml"


def tiny_recipe(run_dir, shards, **extra):
    overrides = {
        "run_dir": str(run_dir), "data.shards": str(shards), "model.preset": "tiny", "train.max_steps": 4,
        "train.batch_size": 8, "train.checkpoint_every": 2, "train.log_every": 1, "optim.warmup_steps": 1,
        "data.num_workers": 0, "logging.tensorboard": False, "logging.progress": False,
        "sampling.per_prompt": 1, "sampling.steps": 2, "sampling.prompts": ["a handwritten 3", "a handwritten 7"],
        **extra,
    }
    return load_recipe(ROOT / "recipes" / "digits.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_checkpoint_and_generate(tmp_path, digit_shards):
    run = tmp_path / "run"
    summary = train(tiny_recipe(run, digit_shards))
    assert (summary.start_step, summary.final_step, summary.skipped_steps) == (0, 4, 0)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["2", "4"]
    for name in ("model.safetensors", "ema.safetensors", "recipe.yaml"):
        assert (run / "checkpoints" / "4" / name).is_file()
    assert (run / "recipe.yaml").is_file() and list((run / "samples").glob("*.png"))
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)

    pipe = flowmatch.Pipeline.from_checkpoint(run)
    images = pipe.generate(["a handwritten digit seven", "a handwritten 1"], steps=3, seed=5)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert pipe.last_nfe == 3
    # Same seed, same images, whatever the batch; another seed, other images.
    again = pipe.generate(["a handwritten digit seven"], steps=3, seed=5)
    assert torch.allclose(again[0], images[0], atol=1e-6)
    assert not torch.allclose(pipe.generate(["a handwritten digit seven"], steps=3, seed=6), again)
    # By default the weights validation found better (recorded in meta.json, logged beside both losses); ema=True
    # and ema=False force either. The raw weights differ from the EMA.
    ema = load_file(run / "checkpoints" / "4" / "ema.safetensors")
    raw = load_file(run / "checkpoints" / "4" / "model.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    validation = [m for m in read_metrics(run) if "val_loss_ema" in m]
    assert [m["step"] for m in validation] == [4]
    assert validation[0]["val_loss_ema"] != validation[0]["val_loss_raw"]  # the EMA loss is the EMA weights'
    ema_better = validation[0]["val_loss_ema"] <= validation[0]["val_loss_raw"]
    assert read_meta(run).ema_default is ema_better
    name = next(iter(raw))
    assert torch.equal(pipe.model.state_dict()[name], (ema if ema_better else raw)[name])
    for choice, weights in ((True, ema), (False, raw)):
        assert torch.equal(flowmatch.Pipeline.from_checkpoint(run, ema=choice).model.state_dict()[name], weights[name])


def test_resumed_run_is_bit_identical(tmp_path, digit_shards, capsys):
    """Also the EMA's warm-up (its update count) and the post-hoc profiles, restored from their snapshot."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    const = {"optim.schedule": "constant", "train.ema_profiles": [0.05, 0.1]}  # cosine's shape depends on max_steps
    train(tiny_recipe(straight, digit_shards, **{"train.max_steps": 4}, **const))
    train(tiny_recipe(split, digit_shards, **{"train.max_steps": 2}, **const))
    summary = train(tiny_recipe(split, digit_shards, **{"train.max_steps": 4}, **const))
    out = capsys.readouterr().out
    assert summary.start_step == 2 and "resuming from" in out and "EMA profiles restored from" in out
    for name in ("checkpoints/4/model.safetensors", "checkpoints/4/ema.safetensors", "ema/snapshots/4.safetensors"):
        a = load_file(straight / name)
        b = load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    loss_a = [m["loss"] for m in read_metrics(straight) if "loss" in m]
    loss_b = [m["loss"] for m in read_metrics(split) if "loss" in m]
    assert loss_a == loss_b


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, digit_shards, monkeypatch):
    calls = {"n": 0}
    real = Trainer.micro_loss

    def flaky(self, batch, generator):
        m = real(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 3:  # one bad micro batch: its optimizer step is discarded, training goes on
            m.loss = m.loss * float("nan")
        return m

    monkeypatch.setattr(Trainer, "micro_loss", flaky)
    summary = train(tiny_recipe(tmp_path / "a", digit_shards))
    # The update with the bad micro batch was discarded and retried on the next batches: still 4 steps, one skipped.
    assert summary.final_step == 4 and summary.skipped_steps == 1
    logged = [m for m in read_metrics(tmp_path / "a") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in logged)
    assert logged[-1]["skipped_steps"] == 1

    def broken(self, batch, generator):
        m = real(self, batch, generator)
        if self.step >= 2:
            m.loss = m.loss * float("inf")
        return m

    monkeypatch.setattr(Trainer, "micro_loss", broken)
    with pytest.raises(TrainingError, match="non-finite in 3 optimizer steps in a row"):
        train(tiny_recipe(tmp_path / "b", digit_shards, **{"train.max_bad_steps": 3}))
    assert (tmp_path / "b" / "checkpoints" / "2" / "model.safetensors").is_file()  # the last good one is intact


def run_cli(*args) -> subprocess.CompletedProcess:
    """`flowmatch ARGS` in this process (`python -m flowmatch` is `sys.exit(main())`; a fresh interpreter would cost
    seconds of imports): its exit status and what it printed. The `-m flowmatch` entry itself is launched by the
    slow tests (tests/test_train_distributed.py)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return subprocess.CompletedProcess(["flowmatch", *args], code, out.getvalue(), err.getvalue())


def test_cli_train_sample_and_errors(tmp_path, digit_shards):
    run = tmp_path / "run"
    res = run_cli("train", str(RECIPE), f"run_dir={run}", f"data.shards={digit_shards}",
                  "model.preset=tiny", "train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=2",
                  "data.num_workers=0", "logging.tensorboard=false", "sampling.per_prompt=1", "sampling.steps=2")
    assert res.returncode == 0, res.stderr
    assert "trained" in res.stdout and (run / "checkpoints" / "2").is_dir()

    out = tmp_path / "grid.png"
    res = run_cli("sample", str(run), "--prompt", "a handwritten 4", "--prompt", "nine", "--num", "3",
                  "--steps", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(out).size == (3 * 8 + 4, 2 * 8 + 3)  # 3 columns, 2 rows, 1-pixel padding

    res = run_cli("train", str(RECIPE), "train.max_step=3")
    assert res.returncode == 2 and "Did you mean 'train.max_steps'" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("sample", str(tmp_path / "nothing"), "--prompt", "x")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "nothing" in res.stderr


def test_flowmatch_ema_reconstructs_from_a_run_and_pipelines_load_it_by_name(tmp_path, digit_shards):
    """Bugs caught: the profiles tracked with another gamma than the warm-up's, the snapshots or `flowmatch ema`
    mixing up profiles or steps, load_pipeline ignoring a named EMA. Below the cap, the training EMA with warm-up
    0.1 is the sigma_rel 0.1 power profile, which post-hoc EMA reproduces from the snapshot that tracked it."""
    run = tmp_path / "run"
    train(tiny_recipe(run, digit_shards, **{"train.ema_profiles": [0.05, 0.1], "train.ema_snapshot_every": 1}))
    assert sorted(int(p.stem) for p in (run / "ema" / "snapshots").glob("*.safetensors")) == [1, 2, 3, 4]
    res = run_cli("ema", str(run), "--sigma-rel", "0.1,0.07")
    assert res.returncode == 0, res.stderr
    assert "sigma_rel 0.07 at step 4 from 4 snapshots" in res.stdout and "ema='sigma_rel-0.1'" in res.stdout
    ema = load_file(run / "checkpoints" / "4" / "ema.safetensors")
    named = flowmatch.Pipeline.from_checkpoint(run, ema="sigma_rel-0.1").model.state_dict()
    assert all(torch.allclose(named[k], ema[k], rtol=0, atol=1e-6) for k in ema)
    other = flowmatch.Pipeline.from_checkpoint(run, ema="sigma_rel-0.07").model.state_dict()
    assert any(not torch.allclose(other[k], ema[k], rtol=0, atol=1e-5) for k in ema)
    with pytest.raises(FileNotFoundError, match="no EMA named 'sigma_rel-0.2'.*there: sigma_rel-0.07, sigma_rel-0.1"):
        flowmatch.Pipeline.from_checkpoint(run, ema="sigma_rel-0.2")


def run_cli_process(*args) -> subprocess.CompletedProcess:
    """`python -m flowmatch ARGS` in a fresh interpreter: for what ends the process (a failed run exits 1)."""
    return subprocess.run([sys.executable, "-m", "flowmatch", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.slow  # a fresh interpreter: the failed run ends its process
def test_missing_shards_without_a_builder_is_a_clear_error(tmp_path):
    res = run_cli_process("train", f"run_dir={tmp_path / 'r'}", f"data.shards={tmp_path / 'none'}", "data.prepare=",
                  "model.preset=tiny")
    assert res.returncode == 1 and "flowmatch-data" in res.stderr and "Traceback" not in res.stderr
