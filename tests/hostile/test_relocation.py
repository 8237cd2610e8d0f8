"""A run opens from any working directory: the relative paths its recipe holds (here the latent digits run's
autoencoder, ``assets/vae``, and its shards) are read where the run was trained; a run whose assets moved says
which path it looked for and how to point it elsewhere (``relocate=`` / ``--relocate KEY=PATH``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_tools.autoencoder import AutoencoderSettings, train_autoencoder

pytestmark = pytest.mark.hostile

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "digits-latent.yaml"
# 16x16 digits, 2x down to 8x8x4 latents: a few seconds of CPU.
TINY_AE = AutoencoderSettings(resolution=16, channels=1, latent_channels=4, downsample=2, width=8, steps=2,
                              batch_size=16, checkpoint_every=0)
PROMPTS = ["a handwritten 3"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digit_shards):
    """A one-step latent run trained in ``work/`` with a relative autoencoder path and relative shards."""
    from flowmatch.config import load_recipe
    from flowmatch.training import train

    work = tmp_path_factory.mktemp("work")
    (work / "data").symlink_to(digit_shards, target_is_directory=True)
    shards = "data/{train-000000,val-000000}.tar"
    before = Path.cwd()
    os.chdir(work)  # a module fixture: monkeypatch.chdir is function-scoped
    try:
        train_autoencoder(shards, work / "assets" / "vae", TINY_AE, progress=False)
        overrides = {
            "run_dir": "run", "data.shards": shards, "data.resolution": 16, "data.cache": "",
            "data.num_workers": 0, "autoencoder.name_or_path": "assets/vae", "autoencoder.prepare": "",
            "model.preset": "tiny", "train.max_steps": 1, "train.batch_size": 8, "train.ema_profiles": [],
            "optim.warmup_steps": 1, "logging.tensorboard": False, "logging.progress": False,
            "sampling.per_prompt": 1, "sampling.steps": 1, "sampling.prompts": PROMPTS, "eval.task": "generic",
        }
        train(load_recipe(RECIPE, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    finally:
        os.chdir(before)
    return work


def test_a_run_with_relative_assets_opens_from_another_directory(trained_run, tmp_path, monkeypatch, capsys):
    """Bugs caught: the autoencoder looked up relative to the reader's working directory (the run cannot be
    sampled or evaluated from anywhere else), the shards' pattern left relative."""
    import flowmatch
    from flowmatch.cli import main

    monkeypatch.chdir(tmp_path)
    run = trained_run / "run"
    images = flowmatch.Pipeline.from_checkpoint(run, device="cpu").generate(PROMPTS, steps=1)
    assert images.shape == (1, 1, 16, 16)
    from flowmatch.run import open_run

    recipe = open_run(run, weights=False).recipe
    assert recipe.autoencoder.name_or_path == str(trained_run / "assets" / "vae")
    assert recipe.data.shards == str(trained_run / "data" / "{train-000000,val-000000}.tar")
    assert main(["eval", str(run), "--steps", "1", "--samples", "1", "--likelihood-samples", "0"]) == 0
    assert f"checkpoint: {run}" in capsys.readouterr().out


def test_a_run_whose_assets_moved_names_the_path_and_the_override(trained_run, tmp_path, monkeypatch, capsys):
    """Bugs caught: a moved autoencoder giving a hub lookup traceback instead of naming the path looked for and the
    override; the override not reaching the encoders; a typo in the override's key accepted silently."""
    import flowmatch
    from flowmatch.cli import main
    from flowmatch.run import RunAssetMissing

    monkeypatch.chdir(tmp_path)
    run, vae = trained_run / "run", trained_run / "assets" / "vae"
    moved = tmp_path / "moved-vae"
    vae.rename(moved)
    try:
        with pytest.raises(RunAssetMissing, match="--relocate autoencoder.name_or_path=") as err:
            flowmatch.Pipeline.from_checkpoint(run, device="cpu")
        assert str(vae) in str(err.value)
        assert main(["sample", str(run), "--prompt", "a 3", "--num", "1", "--steps", "1", "--out", "g.png"]) == 1
        assert str(vae) in capsys.readouterr().err
        with pytest.raises(ValueError, match="did you mean 'autoencoder.name_or_path'"):
            flowmatch.Pipeline.from_checkpoint(run, relocate={"autoencoder.name_or_pth": str(moved)})
        pipe = flowmatch.Pipeline.from_checkpoint(run, device="cpu", relocate={"autoencoder.name_or_path": str(moved)})
        assert pipe.generate(PROMPTS, steps=1).shape == (1, 1, 16, 16)
        assert main(["sample", str(run), "--prompt", "a 3", "--num", "1", "--steps", "1", "--out", "g.png",
                     "--relocate", f"autoencoder.name_or_path={moved}"]) == 0
        assert (tmp_path / "g.png").is_file()
    finally:
        moved.rename(vae)
