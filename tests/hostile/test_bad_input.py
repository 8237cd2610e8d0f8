"""Typos, nonsense values and damaged files at the entry points: each is one paragraph naming the key or file and
what to do (with a fall back to an older checkpoint where one is involved), never a traceback or a silent guess.
The fine-tuning recipes start from a local pipeline folder with model.init_from alone."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest

from flowmatch.cli import main
from flowmatch.config import load_recipe
from flowmatch.encoders.autoencoder import Autoencoder
from flowmatch.engine import failure
from tests.test_train import ROOT

pytestmark = pytest.mark.hostile

DIGITS = str(ROOT / "recipes" / "digits.yaml")


def quick(run: Path, shards: Path, **extra) -> list[str]:
    """Overrides of a 2-step tiny digits run that checkpoints every step."""
    values = {"run_dir": str(run), "data.shards": str(shards), "model.preset": "tiny", "train.max_steps": 2,
              "train.batch_size": 4, "train.checkpoint_every": 1, "data.num_workers": 0, "logging.tensorboard": False,
              "logging.progress": False, "sampling.steps": 1, "sampling.per_prompt": 1, **extra}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(autouse=True)
def failures_raise(monkeypatch):
    """A failed `flowmatch train` ends its process at once (os._exit); here it raises SystemExit(1) instead."""
    def die(rank, message):
        raise SystemExit(1)

    monkeypatch.setattr(failure, "_die", die)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digit_shards) -> Path:
    """A tiny digits run with checkpoints 1 and 2; tests copy it before damaging it."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", DIGITS, *quick(run, digit_shards)]) == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def one_paragraph(err: str, *words: str) -> None:
    """The error names what it should and carries no traceback."""
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def plant(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and rewrite its manifest entry to match, as a forger would."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def huge_header(path: Path) -> bytes:
    """The file's bytes with a header length of 2**60."""
    return struct.pack("<Q", 2**60) + path.read_bytes()[8:]


# ------------------------------------------------------------------------------------------------- recipes


def test_scientific_notation_is_a_number_on_the_command_line_and_in_yaml(tmp_path, digit_shards):
    recipe = tmp_path / "lr.yaml"
    recipe.write_text(f"base: {DIGITS}\noptim:\n  lr: 1e-4\nflow:\n  shift: 2E+0\n")
    assert load_recipe(recipe).optim.lr == 1e-4 and load_recipe(recipe).flow.shift == 2.0
    assert load_recipe(DIGITS, ["optim.lr=3e-4"]).optim.lr == 3e-4


@pytest.mark.parametrize("override, said", [
    ("optim.lr=!!python/object/apply:os.system ['true']", "never accepted"),
    ("optim.lr=[1", "not a YAML value"),
])
def test_a_tag_or_syntax_error_in_an_override_is_a_recipe_error(override, said, tmp_path, digit_shards, capsys):
    assert main(["train", DIGITS, *quick(tmp_path / "run", digit_shards), override]) == 2
    one_paragraph(capsys.readouterr().err, "override optim.lr=", said)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, said", [("base: 5\n", "base: 5 must name another recipe file"),
                                        ("optim:\n  lr: .nan\n", "optim.lr")])
def test_a_non_file_base_or_a_nan_value_is_a_recipe_error(text, said, tmp_path, digit_shards, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text if text.startswith("base") else f"base: {DIGITS}\n{text}")
    assert main(["train", str(recipe), *quick(tmp_path / "run", digit_shards)]) == 2
    one_paragraph(capsys.readouterr().err, said)


def test_null_clears_an_optional_key_and_the_preset(tiny_sd3_pipeline):
    recipe = load_recipe(ROOT / "recipes" / "sd3-lora.yaml",
                         [f"model.init_from={tiny_sd3_pipeline}", "model.preset=null", "model.lora=null"])
    assert recipe.model.lora is None and recipe.model.stated == {}  # no preset to check the weights against


# ------------------------------------------------------------------------------------------------- sample


@pytest.mark.parametrize("option", [["--guidance", "nan"], ["--num", "0"], ["--steps", "0"]])
def test_sample_refuses_nonsense_counts_and_guidance(option, digits_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(digits_run), "--prompt", "a handwritten 3", "--num", "1", *option, "--out", str(out)])
    assert exit_.value.code == 2 and not out.exists()
    one_paragraph(capsys.readouterr().err, f"argument {option[0]}")


# ------------------------------------------------------------------------------------------------- export


def test_export_into_a_file_is_an_error(digits_run, tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("mine")
    assert main(["export", str(digits_run), str(target)]) == 1
    one_paragraph(capsys.readouterr().err, str(target), "is a file")
    assert target.read_text() == "mine"


def test_export_keeps_a_users_scheduler_unless_overwrite(digits_run, tmp_path, capsys):
    mine = tmp_path / "out" / "scheduler" / "scheduler_config.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    (mine.parent / "notes.txt").write_text("mine too")
    other = tmp_path / "out" / "vae" / "config.json"  # a part this export (no pipeline encoders) does not write
    other.parent.mkdir()
    other.write_text("mine")
    assert main(["export", str(digits_run), str(tmp_path / "out")]) == 1
    one_paragraph(capsys.readouterr().err, "already exists in", ": scheduler, vae;", "--overwrite")
    assert mine.read_text() == "mine" and not (tmp_path / "out" / "transformer").exists()
    assert main(["export", str(digits_run), str(tmp_path / "out"), "--overwrite"]) == 0
    assert json.loads(mine.read_text())["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert [p.name for p in mine.parent.iterdir()] == [mine.name]  # replaced as a whole, nothing of the old left
    assert other.read_text() == "mine"  # --overwrite replaces only what the export writes


# ------------------------------------------------------------------------------------------------- train


def test_a_full_disk_at_start_is_one_paragraph(monkeypatch, tmp_path, digit_shards, capsys):
    import torch.utils.tensorboard

    def full(log_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), log_dir)

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", full)
    with pytest.raises(SystemExit):
        main(["train", DIGITS, *quick(tmp_path / "run", digit_shards, **{"logging.tensorboard": True})])
    one_paragraph(capsys.readouterr().err, "disk is full", str(tmp_path / "run" / "tb"), "run_dir=")


@pytest.mark.parametrize("name", ["model.safetensors", "state/rank00000.json"])
def test_a_forged_checkpoint_file_falls_back_to_the_previous_checkpoint(name, digits_run, tmp_path, digit_shards,
                                                                        capsys, caplog):
    """A huge safetensors header or a pickle where state JSON belongs, with the manifest rewritten to match."""
    run = copy_run(digits_run, tmp_path)
    ckpt = run / "checkpoints" / "2"
    plant(ckpt, name, huge_header(ckpt / name) if name.endswith(".safetensors") else pickle.dumps({"step": 2}))
    assert main(["train", DIGITS, *quick(run, digit_shards, **{"train.max_steps": 3})]) == 0
    out = capsys.readouterr()
    one_paragraph(out.err + caplog.text, f"skipping damaged checkpoint {ckpt}: {name}")
    assert (run / "checkpoints" / "2.damaged").is_dir() and "steps 1 -> 3" in out.out


def test_a_pickle_for_meta_json_is_skipped_by_sample(digits_run, tmp_path, capsys, caplog):
    run = copy_run(digits_run, tmp_path)
    plant(run / "checkpoints" / "2", "meta.json", pickle.dumps({"step": 2}))
    out = tmp_path / "g.png"
    assert main(["sample", str(run), "--prompt", "a handwritten 3", "--num", "1", "--out", str(out)]) == 0
    one_paragraph(capsys.readouterr().err + caplog.text, "skipped damaged checkpoint", "meta.json: not JSON")


@pytest.mark.parametrize("damage", ["huge", "corrupt"])
def test_damaged_init_from_weights_are_named(damage, digits_run, tmp_path, digit_shards, capsys):
    weights = tmp_path / "weights.safetensors"
    data = (digits_run / "checkpoints" / "2" / "model.safetensors").read_bytes()
    weights.write_bytes(huge_header(digits_run / "checkpoints" / "2" / "model.safetensors") if damage == "huge"
                        else data[:8] + b"garbage!" + data[16:])
    with pytest.raises(SystemExit):
        main(["train", DIGITS, *quick(tmp_path / "run", digit_shards, **{"model.init_from": str(weights)})])
    one_paragraph(capsys.readouterr().err, f"model.init_from='{weights}'", "is damaged")


# ------------------------------------------------------------------------------ fine-tuning from a local folder


def with_vae_factors(pipeline: Path, out: Path, scale: float, shift: float) -> Path:
    """A copy of a pipeline folder whose VAE config holds other latent factors."""
    shutil.copytree(pipeline, out)
    config = json.loads((out / "vae" / "config.json").read_text())
    (out / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": scale, "shift_factor": shift}))
    return out


@pytest.mark.parametrize("name, fixture", [("sd3-lora", "tiny_sd3_pipeline"), ("flux-lora", "tiny_flux_pipeline")])
def test_the_lora_recipes_train_from_a_local_pipeline_folder(name, fixture, request, tmp_path, digit_shards, capsys):
    folder = with_vae_factors(request.getfixturevalue(fixture), tmp_path / "pipeline", 1.5, 0.06)
    run = tmp_path / "run"
    args = [f"model.init_from={folder}", "model.preset=null", f"run_dir={run}", f"data.shards={digit_shards}",
            "data.resolution=32", "data.num_workers=0", "train.max_steps=1", "train.batch_size=2",
            "train.micro_batch_size=2", "distributed.precision=fp32", "sampling.steps=1", "logging.progress=false",
            "logging.tensorboard=false"]
    recipe_file = str(ROOT / "recipes" / f"{name}.yaml")
    assert main(["train", recipe_file, *args]) == 0, capsys.readouterr().err
    ran = load_recipe(run / "recipe.yaml")
    assert {c.name_or_path for c in ran.text.encoders.values()} == {str(folder)} == {ran.autoencoder.name_or_path}
    vae = Autoencoder(ran.autoencoder, device="cpu")
    assert (vae.scale, vae.shift) == (1.5, 0.06)  # the folder's factors, not the sd3 / flux table's
    explicit = Autoencoder(load_recipe(recipe_file, [*args, "autoencoder.preset=sd3"]).autoencoder, device="cpu")
    assert (explicit.scale, explicit.shift) == (1.5305, 0.0609)  # a preset the recipe states still wins
    merged = tmp_path / "merged"  # a whole pipeline folder: its components are parts too
    assert main(["export", str(run), str(merged), "--merge"]) == 0
    assert main(["export", str(run), str(merged), "--merge"]) == 1
    assert main(["export", str(run), str(merged), "--merge", "--overwrite"]) == 0
    assert (merged / "model_index.json").is_file() and (merged / "vae" / "config.json").is_file()
