"""Qwen-Image-Edit (family ``qwen_image_edit``) against a tiny random QwenImageEditPipeline folder
(tests/tiny_pipelines_qwen.py): the folder read into flowmatch's sections, the edited images from the same
latents, steps and sigmas (true CFG with a negative prompt included), the trainer showing the VL encoder each
paired sample's reference, and the released shape's parameter count.

The pipeline resizes a reference to about a megapixel (``calculate_dimensions(1024 * 1024, ratio)``); the tests
use a small area on both sides: diffusers' module-level function patched here, ours through the Pipeline's
``reference_size`` (``functools.partial(reference_size, area=AREA)``)."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image

from flowmatch import Pipeline
from flowmatch.config import load_recipe
from flowmatch.data import features
from flowmatch.data.batch import Batch
from flowmatch.data.config import DataConfig
from flowmatch.data.shardformat import reference_ext
from flowmatch.data.tarstream import read_shard
from flowmatch.encoders.cache import encode_shard
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.families import family_of
from flowmatch.families.convert import architecture_of
from flowmatch.families.presets import config_from_preset
from flowmatch.families.qwen_image_edit import TEXT_ENCODER, reference_size
from flowmatch.models.mmdit import MMDiT
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.lora_e2e import write_edit_pairs
from tests.test_train import ROOT
from tests.tiny_pipelines_qwen import LATENT_CHANNELS

PROMPTS = ["a red apple", "a photo of a dog"]
NEGATIVE = "blurry, bad quality"
PIXEL_ATOL = 1e-3
SIZE = 32  # the target: 8x8 latents at the tiny VAE's factor 4, 16 packed tokens
VAE_FACTOR = 4
#: The reference area of the tests: a 40x60 reference becomes 64x128 pixels (16x32 latents, 128 packed tokens).
AREA = 96 * 96
STEPS = 3


@pytest.fixture(scope="module")
def edit(tiny_qwen_edit_pipeline):
    pipe = QwenImageEditPipeline.from_pretrained(tiny_qwen_edit_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_qwen_edit_pipeline):
    pipe = Pipeline.from_diffusers(tiny_qwen_edit_pipeline, device="cpu")
    pipe.reference_size = functools.partial(reference_size, area=AREA)
    return pipe


@pytest.fixture
def small_area(monkeypatch):
    """diffusers' edit pipeline resizing references to AREA pixels instead of 1024 * 1024."""
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: original(AREA, ratio))


def references(seed: int, height: int = 40, width: int = 60) -> list:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy()) for _ in PROMPTS]


def test_the_family_and_recipe_state_the_edit_pipelines_encoding_and_resize(edit):
    assert TEXT_ENCODER["template"] == edit.prompt_template_encode
    assert TEXT_ENCODER["drop_tokens"] == edit.prompt_template_encode_start_idx
    recipe = load_recipe(ROOT / "recipes" / "qwen-image-edit-lora.yaml", [])
    encoder = recipe.text_encoders.encoders["qwen"]
    assert {k: getattr(encoder, k) for k in TEXT_ENCODER} == TEXT_ENCODER
    assert recipe.data.paired and family_of(recipe.model).name == "qwen_image_edit"
    for height, width in ((40, 60), (1000, 333), (768, 1366), (512, 512)):
        w, h, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, width / height)
        assert reference_size(height, width, 16) == (h, w)


def test_reading_the_edit_folder(tiny_qwen_edit_pipeline, ours):
    configs = encoder_configs_from_pipeline(tiny_qwen_edit_pipeline)
    (text,) = configs.text_encoders.encoders.values()
    assert configs.pipeline_class == "QwenImageEditPipeline" and configs.family == "qwen_image_edit"
    assert (text.processor_subfolder, text.drop_tokens, text.max_length) == ("processor", 64, 1024)
    assert ours.encoders.sees_images and ours.model.cfg.references == 1
    assert family_of(ours.model.cfg).name == "qwen_image_edit"


def test_from_diffusers_edits_as_the_edit_pipeline(ours, edit, small_area):
    """Two prompts, each with its reference, against one pipeline call per prompt (the pipeline shows its VL
    encoder the resized reference only for a single image: a list goes to the processor unresized).
    Bugs caught: the VL encoder not shown the reference (prompt or negative prompt), the reference resized to
    the target's size instead of the pipeline's area, the negative prompt ignored."""
    h = w = SIZE // VAE_FACTOR
    noise = image_noise([0, 1], (LATENT_CHANNELS, h, w))
    refs = references(0)

    def theirs(**kwargs):
        return torch.cat([edit(image=refs[i], prompt=PROMPTS[i], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                               latents=QwenImageEditPipeline._pack_latents(noise[i:i + 1], 1, LATENT_CHANNELS, h, w),
                               output_type="pt", **{"true_cfg_scale": 1.0, **kwargs}).images
                          for i in range(len(PROMPTS))])

    def mine(**kwargs):
        return ours.generate(PROMPTS, images=refs, noise=noise, **{"steps": STEPS, **kwargs})

    guided = mine(guidance_scale=4.0, negative_prompt=NEGATIVE)
    errors = {"guided": max_diff(guided, theirs(negative_prompt=NEGATIVE, true_cfg_scale=4.0))}
    plain = mine(guidance_scale=1.0)
    errors["plain"] = max_diff(plain, theirs())
    sigmas = [1.0, 0.7, 0.3]
    errors["sigmas"] = max_diff(mine(guidance_scale=1.0, sigmas=sigmas), theirs(sigmas=sigmas))
    print(f"QwenImageEditPipeline vs flowmatch, max |pixel difference|: {errors}")
    assert max(errors.values()) < PIXEL_ATOL, errors
    # The comparisons can fail: each of these moves the tiny model's images past the bound (about 1e-2).
    white = [Image.new("RGB", (60, 40), (255, 255, 255))] * len(PROMPTS)
    moved = {"negative prompt": max_diff(mine(guidance_scale=4.0), guided),
             "reference": max_diff(ours.generate(PROMPTS, images=white, noise=noise, steps=STEPS,
                                                  guidance_scale=1.0), plain)}
    (encoder,) = ours.encoders.text.encoders.values()
    processor, encoder.processor = encoder.processor, None  # the encoder no longer sees the image
    try:
        moved["image unseen by the encoder"] = max_diff(mine(guidance_scale=1.0), plain)
    finally:
        encoder.processor = processor
    print(f"what each change moves: {moved}")
    assert min(moved.values()) > 5 * PIXEL_ATOL, moved


def test_the_trainer_shows_the_encoder_each_samples_reference(ours):
    """A paired batch: the text conditioning is the captions read with each sample's first reference image,
    the reference latents the autoencoder's. Bug caught: encode_batch encoding the captions alone."""
    g = torch.Generator().manual_seed(3)
    ref_images = torch.rand(2, 1, 3, 32, 48, generator=g) * 2 - 1
    batch = Batch(images=torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, captions=PROMPTS, keys=["a", "b"],
                  ref_images=ref_images)
    _, cond = ours.encoders.encode_batch(batch)
    want = ours.encoders.encode_text(PROMPTS, [(r[0] + 1) / 2 for r in ref_images])
    assert torch.equal(cond.hidden, want.hidden) and torch.equal(cond.mask, want.mask)
    assert cond.hidden.shape != ours.encoders.encode_text(PROMPTS).hidden.shape or not torch.allclose(
        cond.hidden, ours.encoders.encode_text(PROMPTS).hidden)
    assert torch.equal(cond.reference[0], ours.encoders.encode_references(ref_images)[:, 0])


def test_cached_text_reads_each_caption_with_its_reference(ours, tmp_path):
    """flowmatch-data encode on paired shards caches the VL encoder's states of each caption read with its
    sample's reference, as the trainer encodes raw batches and the sampler a PIL image. Bugs caught: the cache
    encoding the captions alone, a tensor in [0, 1] given to the processor as it is (it rescales by 1/255)."""
    src = write_edit_pairs(tmp_path / "shards", count=2)
    (url,) = [str(p) for p in src.glob("*.tar")]
    target = tmp_path / "cached" / "000000.tar"
    target.parent.mkdir()
    encode_shard(ours.encoders, DataConfig(shards=url, resolution=SIZE, channels=3, paired=True), url, target,
                 dtype="fp32")
    cached = {r.key: features.decode(r.files[features.EXT]) for r in read_shard(str(target))}
    records = list(read_shard(url))
    assert sorted(cached) == sorted(r.key for r in records)
    for record in records:
        ref = Image.open(io.BytesIO(record.files[reference_ext(0, "png")]))
        caption = record.files["txt"].decode()
        want = ours.encoders.encode_text([caption], [ref])  # the image as a PIL image reads as its tensor
        blind = ours.encoders.encode_text([caption])
        got = cached[record.key].hidden
        assert got.shape == want.hidden[0].shape and (got - want.hidden[0]).abs().max() < 1e-5
        assert got.shape != blind.hidden[0].shape


def test_released_shape_has_diffusers_parameter_count():
    cfg = config_from_preset("qwen-image-edit")
    assert family_of(cfg).name == "qwen_image_edit" and cfg.references == 1
    with torch.device("meta"):
        theirs = QwenImageTransformer2DModel(**architecture_of(cfg).diffusers_config(cfg))
    count = sum(p.numel() for p in MMDiT(cfg, device="meta").parameters())
    assert count == sum(p.numel() for p in theirs.parameters())

