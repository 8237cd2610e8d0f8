"""The FLUX.1 Kontext family against diffusers' FluxKontextPipeline on the tiny random pipeline of
tests/tiny_pipelines_kontext.py: its folder read as Kontext's, `Pipeline.from_diffusers` giving the pipeline's
images from the same latents, steps and reference images (tensors and PIL images, references of different sizes
sampled as separate batches), references resized as the pipeline resizes them, and references refused by a
family that takes none."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from flowmatch import Pipeline
from flowmatch.encoders.diffusers_folder import encoder_configs_from_pipeline
from flowmatch.families import FAMILIES, family_of
from flowmatch.families.convert import read_config
from flowmatch.families.kontext import KONTEXT_RESOLUTIONS, reference_size
from flowmatch.sampling.generate import image_noise
from tests.interop_models import max_diff, one_thread  # noqa: F401 - applies the module-wide fixture
from tests.tiny_pipelines import LATENT_CHANNELS

PROMPTS = ["a photo of a cat", "a red apple on a wooden table"]
PIXEL_ATOL = 1e-3
SIZE = 32  # pixels: 16x16 latents at the tiny VAE's factor 2
STEPS = 3


@pytest.fixture(scope="module")
def kontext(tiny_kontext_pipeline):
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_kontext_pipeline):
    return Pipeline.from_diffusers(tiny_kontext_pipeline, device="cpu")


def _noise(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(our noise (B, C, h, w), the same packed as FluxKontextPipeline takes its latents)."""
    h = w = SIZE // 2
    noise = image_noise(list(range(n)), (LATENT_CHANNELS, h, w))
    return noise, FluxKontextPipeline._pack_latents(noise, n, LATENT_CHANNELS, h, w)


def _theirs(pipe, prompts, image, packed, **kwargs) -> torch.Tensor:
    # max_area = the image's own area keeps height x width as given; _auto_resize=False keeps the reference's
    # size (the released resolutions are a megapixel, too large for a CPU test).
    return pipe(image=image, prompt=prompts, latents=packed.clone(), num_inference_steps=STEPS, height=SIZE,
                width=SIZE, max_area=SIZE * SIZE, _auto_resize=False, output_type="pt", **kwargs).images



def test_the_kontext_folder_reads_as_the_kontext_family(tiny_kontext_pipeline, tmp_path):
    configs = encoder_configs_from_pipeline(tiny_kontext_pipeline)
    assert configs.pipeline_class == "FluxKontextPipeline" and configs.family == "kontext"
    assert configs.text_encoders.combine == "flux" and configs.guidance_embed
    for folder in (tiny_kontext_pipeline, tiny_kontext_pipeline / "transformer"):
        cfg = read_config(folder)
        assert family_of(cfg) is FAMILIES["kontext"] and cfg.references == 1
    # The same FluxTransformer2DModel is FLUX.1's outside a Kontext pipeline folder.
    alone = shutil.copytree(tiny_kontext_pipeline / "transformer", tmp_path / "transformer")
    assert family_of(read_config(alone)) is FAMILIES["flux"]


def test_from_diffusers_gives_the_pipelines_images_with_reference_tensors(kontext, ours):
    assert ours.model.cfg.references == 1 and ours.recipe.sampling.guidance_scale == 3.5
    noise, packed = _noise()
    refs = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))  # not the target's size
    mine = ours.generate(PROMPTS, images=refs, noise=noise, steps=STEPS, auto_resize=False)
    assert max_diff(mine, _theirs(kontext, PROMPTS, refs, packed)) < PIXEL_ATOL
    # The comparison can fail: without the references, or with other ones, the images move far beyond it.
    assert max_diff(mine, ours.generate(PROMPTS, noise=noise, steps=STEPS)) > 5 * PIXEL_ATOL
    assert max_diff(mine, ours.generate(PROMPTS, images=1 - refs, noise=noise, steps=STEPS,
                                         auto_resize=False)) > 5 * PIXEL_ATOL


def test_pil_references_of_different_sizes_are_sampled_as_separate_batches(kontext, ours):
    g = torch.Generator().manual_seed(1)
    pil = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((20, 36), (28, 28))]
    noise, packed = _noise()
    mine = ours.generate(PROMPTS, images=[[pil[0]], pil[1]], noise=noise, steps=STEPS, auto_resize=False)
    for i in range(2):  # diffusers takes one reference size per call: each prompt on its own
        theirs = _theirs(kontext, PROMPTS[i], pil[i], packed[i:i + 1])
        assert max_diff(mine[i:i + 1], theirs) < PIXEL_ATOL, i


def test_references_are_resized_as_the_pipeline_resizes_them(ours):
    assert KONTEXT_RESOLUTIONS == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    for height, width in ((480, 640), (1000, 400), (512, 512)):
        aspect = width / height  # FluxKontextPipeline.__call__'s _auto_resize, then its multiple of 16
        _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        assert reference_size(height, width, 16) == (h // 16 * 16, w // 16 * 16)
    # The pipeline uses its family's rule (the tiny VAE's factor 2 times the 2x2 packing: multiples of 4).
    pixels = ours._reference_pixels(torch.rand(1, 3, 30, 60), 1, SIZE, SIZE, auto_resize=True)
    assert pixels[0][0].shape == (3, *reference_size(30, 60, 4))


def test_references_are_refused_by_a_family_that_takes_none(tiny_flux_pipeline):
    flux = Pipeline.from_diffusers(tiny_flux_pipeline, device="cpu")
    with pytest.raises(ValueError,
                       match="model family 'flux' takes none.*editing family \\(kontext, qwen_image_edit\\)"):
        flux.generate(PROMPTS, images=torch.rand(2, 3, SIZE, SIZE), steps=1)


def test_bad_reference_images_name_the_problem(ours):
    for images, match in (
        (torch.rand(3, 3, SIZE, SIZE), r"\(2, C, H, W\) tensor"),
        ([torch.rand(3, SIZE, SIZE)], "each of the 2 prompts"),
        ([torch.rand(3, SIZE, SIZE) * 2 - 1, torch.rand(3, SIZE, SIZE)], r"images\[0\] has values in"),
        ([torch.rand(3, SIZE, SIZE), "cat.png"], r"images\[1\] is a str"),
        ([[torch.rand(3, SIZE, SIZE)] * 2, torch.rand(3, SIZE, SIZE)], "'kontext' takes at most 1"),
    ):
        with pytest.raises(ValueError, match=match):
            ours.generate(PROMPTS, images=images, steps=1)
