"""The losses fine-tuners use (flow/loss.py): L1 and pseudo-Huber with its delta schedules as known values, the
masked loss (its gradients outside the mask are exactly zero, through micro_loss), and masks from the data (a
folder's NAME.mask.png, an alpha channel, a mask of another size) reaching Batch.masks."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_tools.folder import build_folder
from flowmatch.conditioning import Conditioning
from flowmatch.data import DataConfig, build_loader
from flowmatch.flow import FlowConfig, TimeSchedule
from flowmatch.flow.loss import LossConfig, flow_matching_loss
from flowmatch.models.convert.keymap import Copy
from flowmatch.models.lora import LoraConfig, Projection, inject, is_adapter
from flowmatch.training.loop import micro_loss


def test_l1_and_pseudo_huber_are_their_formulas():
    """Bugs caught: the square kept for l1, Huber's c not scaled per sample or its schedule ends swapped."""
    diff = torch.tensor([[3.0, -0.01], [0.5, 2.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    pred, target = diff, torch.zeros_like(diff)
    l1 = flow_matching_loss(pred, target, t, loss=LossConfig(kind="l1"))
    assert torch.allclose(l1.per_sample, torch.tensor([1.505, 1.25], dtype=torch.float64).float())
    c = 0.5
    for schedule, cs in [("constant", (c, c)), ("exponential", (1.0, c)), ("snr", (1.0, (1 - c) / 4 + c))]:
        out = flow_matching_loss(pred, target, t, loss=LossConfig(kind="pseudo_huber", huber_c=c,
                                                                  huber_schedule=schedule))
        want = [sum(2 * ci * (math.sqrt(e * e + ci * ci) - ci) for e in row) / 2
                for row, ci in zip(diff.tolist(), cs)]
        assert torch.allclose(out.per_sample, torch.tensor(want).float()), schedule
    # the square for small errors
    small = flow_matching_loss(torch.full((1, 4), 1e-2), torch.zeros(1, 4), torch.zeros(1),
                               loss=LossConfig(kind="pseudo_huber", huber_c=0.5)).loss
    assert small.item() == pytest.approx(1e-4, rel=1e-3)
    with pytest.raises(ValueError, match=r"flow.loss.kind.*did you mean 'pseudo_huber'"):
        LossConfig(kind="pseudo_hubr")


def test_the_recipes_loss_reaches_the_schedule():
    """Bug caught: TimeSchedule.loss not passing flow.loss on (MSE whatever the recipe says)."""
    pred, target, t = torch.full((2, 3), 2.0), torch.zeros(2, 3), torch.rand(2)
    assert TimeSchedule(FlowConfig(loss=LossConfig(kind="l1"))).loss(pred, target, t).loss.item() == 2.0
    assert TimeSchedule(FlowConfig()).loss(pred, target, t).loss.item() == 4.0


class Pointwise(nn.Module):
    """A velocity that reads each latent cell alone (a 1x1 projection), with a LoRA adapter on it: what the
    region outside the mask holds cannot reach the prediction inside."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, channels)

    def forward(self, x, t, cond):
        return self.proj(x.movedim(1, -1)).movedim(-1, 1)


def adapter_grads(x0: torch.Tensor, mask, flow: FlowConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Pointwise(x0.shape[1])
    inject(model, LoraConfig(rank=2, alpha=2.0), [Projection("proj", ("proj",), Copy())])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.normal_()
    cond = Conditioning(torch.zeros(x0.shape[0], 1, 4), torch.ones(x0.shape[0], 1, dtype=torch.bool),
                        torch.zeros(x0.shape[0], 4))
    out = micro_loss(model, x0, cond, cond, schedule=TimeSchedule(flow), flow=flow, patch_size=1,
                     generator=torch.Generator().manual_seed(1), mask=mask)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["mse", "pseudo_huber"])
def test_outside_the_mask_the_adapters_gradients_are_exactly_zero(kind):
    """The data outside the mask is changed wildly: the adapters' gradients stay bit-identical (they get exactly
    nothing from there), and differ once the mask is dropped. Bugs caught: the mask ignored anywhere between
    micro_loss and the loss, the mean taken over all cells, the mask not brought to the latent grid."""
    flow = FlowConfig(loss=LossConfig(kind=kind), caption_dropout=0.0)
    x0 = torch.randn(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 16, 16)  # pixels: 4 per latent cell along each side
    mask[0, :, :8, :] = 1.0
    mask[1, :, 4:12, 8:] = 1.0
    outside = x0.clone()
    keep = torch.nn.functional.adaptive_avg_pool2d(mask, (4, 4)) > 0
    outside[~keep.expand_as(x0)] = 100.0
    masked, changed = adapter_grads(x0, mask, flow), adapter_grads(outside, mask, flow)
    assert masked and all(torch.equal(masked[n], changed[n]) for n in masked)
    assert all(g.abs().max() > 0 for g in masked.values())
    plain = adapter_grads(outside, None, flow)
    assert not all(torch.equal(masked[n], plain[n]) for n in masked)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def masked_folder(tmp_path) -> Path:
    """Shards of three 16x16 samples: "a" with a NAME.mask.png twice as wide as its image (the left quarter
    white), "b" RGBA with its lower half opaque, "c" with neither."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png(Image.new("RGB", (16, 16), (200, 30, 60))))
    (src / "a.txt").write_text("masked by a file")
    half = np.zeros((16, 32), dtype=np.uint8)  # twice as wide as the image: cropped unless resized to it first
    half[:, :8] = 255  # the left quarter
    (src / "a.mask.png").write_bytes(png(Image.fromarray(half)))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[8:, :, 3] = 255  # lower half opaque
    (src / "b.png").write_bytes(png(Image.fromarray(rgba, "RGBA")))
    (src / "b.txt").write_text("masked by its alpha")
    (src / "c.png").write_bytes(png(Image.new("RGB", (16, 16))))
    (src / "c.txt").write_text("no mask")
    report = build_folder(src, tmp_path / "out", shuffle=False)
    assert report.written == 3 and not report.skipped
    return tmp_path / "out"


def batch_masks(shards: Path, **data) -> dict[str, torch.Tensor]:
    loader = build_loader(DataConfig(shards=str(shards), prepare="", resolution=8, channels=3, num_workers=0,
                                     shuffle=False, **data), rank=0, world_size=1, batch_size=3, seed=0, epochs=1)
    (batch,) = list(loader)
    return dict(zip(batch.keys, batch.masks))


def test_masks_from_a_folder_and_an_alpha_channel_reach_the_batch(tmp_path):
    """NAME.mask.png of another size is resized to the image (its left quarter white -> the left quarter 1); an
    alpha channel is a mask only with data.alpha_masks; a sample with neither counts everywhere. Bugs caught: the
    mask file left out of the shard, read as its own sample, not resized, alpha taken by default (a transparent
    product photo trained on the object alone) or ignored when asked for, data.masks off by default."""
    shards = masked_folder(tmp_path)
    masks = batch_masks(shards)
    a = masks["a"][0]  # (8, 8); the resize softens the one edge row or column on each side
    assert torch.all(a[:, 0] == 1) and torch.all(a[:, 3:] == 0) and torch.all(a[:, 1] > a[:, 2])
    assert torch.equal(masks["b"], torch.ones(1, 8, 8)) and torch.equal(masks["c"], torch.ones(1, 8, 8))
    b = batch_masks(shards, alpha_masks=True)["b"][0]
    assert torch.all(b[5:] == 1) and torch.all(b[:3] == 0)


def test_cached_features_carry_the_masks(tmp_path):
    """`flowmatch-data encode` stores each sample's mask as cropped to its image, and training on the cache gets
    the raw loader's masks. Bug caught: the masks silently dropped from the cache (the loss then counts
    everywhere)."""
    from data_tools.encode import EncodeSettings, encode_shards

    shards = masked_folder(tmp_path)
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml")
    settings = EncodeSettings(recipe, ("data.channels=3", "data.resolution=8", "data.alpha_masks=true"), batch_size=3,
                              dtype="fp16", device="cpu")
    (shard,) = sorted(shards.glob("*.tar*"))
    report = encode_shards(str(shard), tmp_path / "cached", settings, progress=False)
    assert report.samples == 3 and report.bad == {}
    want, got = batch_masks(shards, alpha_masks=True), batch_masks(tmp_path / "cached")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["a"], torch.ones(1, 8, 8))


def test_the_trainer_hands_the_batchs_masks_to_the_loss(monkeypatch):
    """Bug caught: Trainer.micro_loss not passing Batch.masks on (every sample's loss over the whole image)."""
    from types import SimpleNamespace

    from flowmatch.data.batch import Batch
    from flowmatch.training import loop

    seen = []
    monkeypatch.setattr(loop, "micro_loss", lambda *a, **kw: seen.append(kw["mask"]))
    x0 = torch.zeros(1, 4, 2, 2)
    encoders = SimpleNamespace(encode_batch=lambda batch: (x0, None), dropout_parts=lambda p: None)
    run = SimpleNamespace(encoders=encoders, velocity=None, null=None, schedule=None)
    recipe = SimpleNamespace(flow=FlowConfig(), model=SimpleNamespace(patch_size=1, guidance_embed=False))
    trainer = SimpleNamespace(run=run, recipe=recipe, models=None, jvp_backend="exact")
    mask = torch.rand(1, 1, 8, 8)
    loop.Trainer.micro_loss(trainer, Batch(["c"], ["k"], masks=mask), torch.Generator())
    loop.Trainer.micro_loss(trainer, Batch(["c"], ["k"]), torch.Generator())
    assert torch.equal(seen[0], mask) and seen[1] is None


@pytest.mark.slow  # a real training run (about 10 s)
def test_prior_preservation_sources_reach_the_loss_in_their_weights(tmp_path, monkeypatch):
    """Prior preservation is a second data source with its own captions and a weight (recipes/sd3-lora-prior.yaml):
    the micro batches the loss sees hold each source's samples in the weights' proportion, captions included.
    Bug caught: the mixture's weights not reaching the trainer's loader (every source equally likely)."""
    from flowmatch.data.config import DEFAULT_SHARDS
    from flowmatch.training import loop, train
    from tests.test_data_mixture import mixture
    from tests.test_train import tiny_recipe

    mixture(tmp_path)  # "a": 30 instance samples, weight 3; "b": 14 prior samples with .caption captions, weight 1
    seen: list[str] = []
    real = loop.Trainer.micro_loss

    def record(self, batch, generator):
        seen.extend(batch.captions)
        return real(self, batch, generator)

    monkeypatch.setattr(loop.Trainer, "micro_loss", record)
    sources = [{"shards": str(tmp_path / "a"), "weight": 1, "name": "instance"},
               {"shards": str(tmp_path / "b"), "weight": 3, "caption_key": "caption", "name": "prior"}]
    train(tiny_recipe(tmp_path / "run", DEFAULT_SHARDS, **{"data.prepare": "", "data.sources": sources,
                                                     "train.max_steps": 2, "train.batch_size": 64,
                                                     "train.checkpoint_every": 2, "train.validate_every": 0,
                                                     "train.ema_profiles": []}))
    prior = sum(c.startswith("b caption") for c in seen)
    assert len(seen) == 128 and all(c.startswith(("a caption", "b caption")) for c in seen)
    assert abs(prior / len(seen) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(seen))
