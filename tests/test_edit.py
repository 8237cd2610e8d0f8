"""The editing path end to end on CPU: paired shards -> the trainer -> reference tokens in the model -> the digits
editing job's judge. Each test names the one-line bug it catches."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.digits import DIGIT_WORDS, is_val, load_digits_arrays, to_png
from data_tools.digits_edit import (
    ABSOLUTE_TEMPLATES,
    ABSOLUTES_PER_REFERENCE,
    ADDENDS,
    COPIES_PER_REFERENCE,
    COPY_TEMPLATES,
    HELDOUT_TEMPLATES,
    PARAPHRASES,
    TRAIN_ADDENDS,
    edit_pairs,
    heldout_references,
    instruction,
)
from data_tools.digits_edit_task import TASK as EDIT_TASK
from data_tools.digits_edit_task import judge
from flowmatch.config import load_recipe
from flowmatch.data.shardformat import ShardSink
from flowmatch.errors import RecipeError
from flowmatch.evaluate import EvalPlan
from flowmatch.tasks import register_task, unregister_task

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-edit.yaml"


@pytest.fixture(scope="module", autouse=True)
def edit_task():
    """The digits-edit task, registered in this process (an installed checkout lists it as an entry point)."""
    from flowmatch.tasks import available_tasks

    if "digits-edit" in available_tasks():
        yield
        return
    register_task(EDIT_TASK)
    yield
    unregister_task(EDIT_TASK.name)


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def paired_shards(tmp_path_factory) -> Path:
    """12 train and 4 val paired samples: target value 10 j, reference value 10 j + 5; train sample 3 has no
    reference."""
    out = tmp_path_factory.mktemp("paired")
    for prefix, count in (("train", 12), ("val", 4)):
        with ShardSink(out, prefix=prefix) as sink:
            for j in range(count):
                files = {"png": png(10 * j), "txt": f"add {DIGIT_WORDS[1 + j % 9]}"}
                if not (prefix == "train" and j == 3):
                    files["ref.png"] = png(10 * j + 5)
                sink.write(f"{prefix}{j:02d}", files)
    return out


def tiny(run: Path, shards: Path, *more: str):
    return load_recipe(RECIPE, [f"run_dir={run}", f"data.shards={shards}", "data.prepare=", "data.num_workers=0",
                                "model.depth=1", "train.max_steps=1", "train.batch_size=4", "train.ema_decay=0",
                                "train.checkpoint_every=1", "optim.warmup_steps=0", "logging.tensorboard=false",
                                "logging.progress=false", "sampling.per_prompt=2", "sampling.steps=1",
                                "sampling.prompts=[add one, add two]", *more])


def test_paired_data_needs_an_editing_family_and_an_editing_family_needs_paired_data():
    """Bugs caught: the recipe check of data.paired against the family's reference support left out (either way)."""
    with pytest.raises(RecipeError, match=r"model\.family: kontext is an editing family.*data\.paired is false"):
        load_recipe(RECIPE, ["data.paired=false"])
    with pytest.raises(RecipeError, match=r"data\.paired: true.*'sd3'.*kontext"):
        load_recipe(ROOT / "recipes" / "digits.yaml", ["data.paired=true"])


def test_the_trainer_hands_the_clean_reference_to_the_model_beside_the_noised_target(tmp_path, paired_shards,
                                                                                      monkeypatch):
    """Bugs caught: encode_batch not attaching the batch's references to cond (the model then never sees them), a
    reference noised with the target or concatenated into x, and a sample without its reference trained on
    anyway (it must be counted and skipped)."""
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.training import train
    from flowmatch.training.assembly import EngineVelocity

    batches, calls = [], []
    real_encode, real_call = FrozenEncoders.encode_batch, EngineVelocity.__call__

    def encode(self, batch):
        batches.append(batch)
        return real_encode(self, batch)

    def call(self, x, t, cond):
        out = real_call(self, x, t, cond)
        calls.append((x.detach().clone(), cond, out.shape))
        return out

    monkeypatch.setattr(FrozenEncoders, "encode_batch", encode)
    monkeypatch.setattr(EngineVelocity, "__call__", call)
    summary = train(tiny(tmp_path / "run", paired_shards, "train.log_every=1", "flow.caption_dropout=0"))
    assert summary.final_step == 1
    batch, (x, cond, out_shape) = batches[0], calls[0]  # the training step's: validation comes after it
    assert batch.ref_images.shape == (4, 1, 1, 8, 8) and "train03" not in batch.keys
    assert x.shape == out_shape == batch.images.shape  # the target alone is noised; the velocity is the target's
    assert len(cond.reference) == 1
    torch.testing.assert_close(cond.reference[0], batch.ref_images[:, 0], rtol=0, atol=0)  # clean, this sample's
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"bad_samples": 1.0' in metrics  # train03, without its reference, was counted and skipped


def test_the_validation_grid_shows_each_reference_beside_its_edits(tmp_path, paired_shards):
    """Bug caught: the grid generated without the held-out references (or without the reference column)."""
    from flowmatch.training import train

    train(tiny(tmp_path / "run", paired_shards))
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step0000001.png").convert("L"))
    scale, cell = 4, 9  # GRID_SCALE, 8 pixels + 1 of padding
    first_column = [int(grid[(1 + row * cell + 4) * scale, (1 + 4) * scale]) for row in range(2)]
    assert first_column == [5, 15]  # val00 and val01's references (values 10 j + 5), one per prompt row


def test_the_cache_stores_each_samples_reference_latents_and_training_reads_them(tmp_path, paired_shards):
    """Bugs caught: the cache writing features without the references (or another sample's), and encode_batch
    ignoring a cached batch's reference latents."""
    from flowmatch.data import build_loader, features
    from flowmatch.data.tarstream import read_shard
    from flowmatch.encoders.cache import encode_shard
    from flowmatch.encoders.frozen import FrozenEncoders

    recipe = tiny(tmp_path / "run", paired_shards)
    frozen = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels)
    out = tmp_path / "cache"
    out.mkdir()
    result = encode_shard(frozen, recipe.data, str(paired_shards / "train-000000.tar"), out / "train-000000.tar",
                          dtype="fp32", batch_size=5)
    assert result.samples == 11 and result.bad == {"missing reference": 1}
    for sample in read_shard(str(out / "train-000000.tar")):
        stored = features.decode(sample.files[features.EXT])
        assert stored.references.shape == (1, 1, 8, 8)  # identity autoencoder: latents are the pixels
        torch.testing.assert_close(stored.references[0], stored.latents + 5 / 127.5)  # this sample's reference
    cached = dataclasses.replace(recipe.data, shards=str(out))
    batch = next(iter(build_loader(cached, rank=0, world_size=1, batch_size=4, seed=0, epochs=1)))
    x0, cond = frozen.encode_batch(batch)
    assert batch.ref_latents is not None and batch.ref_images is None
    torch.testing.assert_close(cond.reference[0], batch.ref_latents[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(x0, batch.latents, rtol=0, atol=0)


def test_the_digits_edit_pairs_each_reference_with_another_real_digit_d_plus_k():
    """Bugs caught: a target of the wrong digit (d, or d + K without the mod; an absolute sample's digit not the one
    it names), the reference reused as the target, a target or reference crossing the held-out split, a held-out
    wording leaking into training instructions, copy or absolute samples leaking into the held-out split."""
    _, labels = load_digits_arrays()
    edits = edit_pairs(labels)
    val = sum(is_val(i) for i in range(len(labels)))
    per_train = len(TRAIN_ADDENDS) + COPIES_PER_REFERENCE + ABSOLUTES_PER_REFERENCE
    assert len(edits) == len(ADDENDS) * val + per_train * (len(labels) - val)
    assert {e.k for e in edits if e.val} == set(ADDENDS)
    assert {e.k for e in edits if not e.val} == set(TRAIN_ADDENDS) | {None}
    for e in edits:
        if e.k is None:  # absolute: the digit named, whatever the reference
            named = next(d for d, w in enumerate(DIGIT_WORDS) if w in e.text.split() or str(d) in e.text.split())
            assert labels[e.target] == named
        else:
            assert labels[e.target] == (labels[e.reference] + e.k) % 10
        assert e.target != e.reference and e.val == is_val(e.reference) == is_val(e.target)
    trained = {e.text for e in edits if not e.val}
    assert {instruction(k) for k in TRAIN_ADDENDS} <= trained  # canonical wordings are trained ...
    assert {instruction(k, t) for k in TRAIN_ADDENDS for t in PARAPHRASES} <= trained  # ... and every paraphrase
    assert set(COPY_TEMPLATES) <= trained
    assert {instruction(d, t) for d in range(10) for t in ABSOLUTE_TEMPLATES} <= trained
    assert not trained & {instruction(k, t) for k in TRAIN_ADDENDS for t in HELDOUT_TEMPLATES}
    assert {e.text for e in edits if e.val} == {instruction(k) for k in ADDENDS}


class OraclePipeline:
    """A pipeline that edits correctly: it reads the reference's digit from a lookup of the held-out digits and the
    addend from the prompt, and returns a real digit of (d + K) mod 10; or, with ``copy``, the reference."""

    def __init__(self, recipe, copy: bool = False) -> None:
        self.recipe, self.copy, self.last_nfe = recipe, copy, 0
        images, labels = load_digits_arrays()
        refs, ref_labels = heldout_references()
        self.label_of = {to_png(r): int(d) for r, d in zip(refs, ref_labels)}
        self.example = {d: images[labels == d][-1] for d in range(10)}

    def generate(self, prompts, *, images, steps, solver, seed, guidance_scale):
        self.last_nfe = steps
        assert images.shape == (len(prompts), 1, 8, 8) and 0 <= images.min() and images.max() <= 1
        if self.copy:
            return images
        out = []
        for prompt, ref in zip(prompts, images):
            values = np.round(ref[0].numpy() * 16).astype(np.int64)  # back to the digits' 0..16 scale
            digit = self.label_of[to_png(values)]
            k = next(i for i, w in enumerate(DIGIT_WORDS) if w in prompt.split() or str(i) in prompt.split())
            out.append(torch.from_numpy(self.example[(digit + k) % 10] / 16).float()[None])
        return torch.stack(out)


def test_the_edit_judge_scores_a_correct_editor_high_and_copying_at_the_copy_baseline():
    """Bugs caught: the judge pairing prompts with other references than the ones it scores against, the wanted
    digit not (d + K) mod 10, or the copy baseline not computed from the references."""
    recipe = load_recipe(RECIPE)
    plan = EvalPlan({"euler": [20]}, samples_per_prompt=4, guidance_scale=1.0)
    right = judge(OraclePipeline(recipe), plan)
    row = right.rows[0].metrics
    assert row["edit_accuracy"] >= 0.9 and row["paraphrase_accuracy"] >= 0.9 and row["heldout_wording_accuracy"] >= 0.9
    copied = judge(OraclePipeline(recipe, copy=True), plan)
    assert copied.rows[0].metrics["edit_accuracy"] == pytest.approx(copied.reference["copy_baseline"])
    assert copied.reference["copy_baseline"] <= 0.2  # K >= 1: the reference is never the wanted digit
