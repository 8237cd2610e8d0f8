"""A decoder LLM as a frozen text encoder (flowmatch.encoders.decoder_llm): the chat template, the dropped prefix,
the hidden layers taken and stacked, the mask, and its states through the compact int8 / fp8 text cache, against
QwenImagePipeline.encode_prompt on a tiny random Qwen2.5-VL (tests/tiny_pipelines_qwen.py)."""

from __future__ import annotations

import pytest
import torch

from flowmatch.data import features
from flowmatch.encoders.text import TextEncoderConfig
from flowmatch.encoders.text_set import build_text_encoder
from tests.tiny_pipelines_qwen import TEMPLATE

CAPTIONS = ["a photo of a cat on a wooden table", "red apple", "a dog"]
#: QwenImagePipeline's drop_idx: the template's system prefix in tokens.
DROP = 34


def qwen_config(folder, **overrides) -> TextEncoderConfig:
    values = dict(kind="decoder_llm", name_or_path=str(folder), subfolder="text_encoder",
                  tokenizer_subfolder="tokenizer", template=TEMPLATE, drop_tokens=DROP, hidden_layer=-1,
                  max_length=512, pooling="none", dtype="fp32")
    return TextEncoderConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def qwen_pipe(tiny_qwen_pipeline):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_qwen_pipeline)


@pytest.fixture(scope="module")
def encoder(tiny_qwen_pipeline):
    return build_text_encoder(qwen_config(tiny_qwen_pipeline))


def test_states_and_mask_equal_the_pipelines_prompt_embeds(encoder, qwen_pipe):
    """Bugs caught: the template not applied, the prefix kept or dropped by one token too many, the states of
    another layer, padding rows kept as tokens."""
    cond = encoder.encode(CAPTIONS)
    embeds, mask = qwen_pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=512)
    assert cond.hidden.shape == embeds.shape and cond.pooled.shape == (3, 0)
    assert torch.equal(cond.mask, mask.bool())
    assert (cond.hidden - embeds).abs().max() < 1e-6
    assert encoder.hidden_size == 16 and encoder.pooled_size == 0


def test_captions_of_one_length_carry_no_padding(encoder):
    """Bug caught: the encoder dropping ``all_valid`` (so Qwen-Image's attention always gets a mask, which rules
    out the flash kernels) or claiming it for captions of different lengths."""
    equal, ragged = encoder.encode([CAPTIONS[1], CAPTIONS[1]]), encoder.encode(CAPTIONS)
    assert equal.all_valid and bool(equal.mask.all())
    assert not ragged.all_valid and not bool(ragged.mask.all())


def test_max_length_truncates_as_max_sequence_length(encoder, qwen_pipe):
    short = build_text_encoder(qwen_config(encoder.cfg.name_or_path, max_length=4))
    embeds, _ = qwen_pipe.encode_prompt(CAPTIONS[:1], device="cpu", max_sequence_length=4)
    got = short.encode(CAPTIONS[:1])
    assert got.hidden.shape == (1, 4, 16) and (got.hidden - embeds).abs().max() < 1e-6


def test_stacked_layers_sit_side_by_side(tiny_qwen_pipeline, encoder):
    """FLUX.2's way: several layers' states concatenated along the width, in the order given."""
    stacked = build_text_encoder(qwen_config(tiny_qwen_pipeline, stack_layers=[1, -1]))
    layer1 = build_text_encoder(qwen_config(tiny_qwen_pipeline, hidden_layer=1))
    got, last, first = stacked.encode(CAPTIONS), encoder.encode(CAPTIONS), layer1.encode(CAPTIONS)
    assert stacked.hidden_size == 32 and got.hidden.shape[-1] == 32
    assert torch.equal(got.hidden, torch.cat([first.hidden, last.hidden], dim=-1))
    assert stacked.fingerprint() != encoder.fingerprint() != layer1.fingerprint()


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_states_go_through_the_compact_text_cache(encoder, quant):
    cond = encoder.encode(CAPTIONS[:1])
    hidden, pooled = cond.hidden[0][cond.mask[0]], cond.pooled[0]
    blob = features.encode(torch.zeros(4, 2, 2), hidden, pooled, dtype="bf16", text_quant=quant,
                           encoders={"autoencoder": "vae", "text_encoder": encoder.fingerprint()})
    back = features.decode(blob)
    assert back.pooled.shape == (0,) and back.hidden.shape == hidden.shape
    # Per-token scales: the error is a fraction of each token's largest magnitude (int8: 1/254, fp8: 1/16).
    bound = {"int8": 1 / 254, "fp8": 1 / 16}[quant]
    err = (back.hidden.float() - hidden).abs().amax(-1) / hidden.abs().amax(-1)
    assert err.max() <= bound * 1.01


def test_bad_settings_name_the_key(tiny_qwen_pipeline):
    with pytest.raises(ValueError, match="text_encoder.template is for text_encoder.kind=decoder_llm"):
        TextEncoderConfig(kind="t5", template="say {}")
    with pytest.raises(ValueError, match="text_encoder.template must hold one"):
        qwen_config(tiny_qwen_pipeline, template="no caption here")
    with pytest.raises(ValueError, match="pooling=pooler"):
        build_text_encoder(qwen_config(tiny_qwen_pipeline, pooling="pooler"))
    too_many = build_text_encoder(qwen_config(tiny_qwen_pipeline, drop_tokens=200))
    with pytest.raises(ValueError, match="drop_tokens=200 drops every token"):
        too_many.encode(["a cat"])


def test_the_vl_encoder_sees_the_reference_image_as_the_edit_pipeline_shows_it(tiny_qwen_edit_pipeline):
    """Qwen-Image-Edit's conditioning: the instruction and the reference image through the processor (its image
    placeholder expanded to the image's patches), the LLM's states without the 64-token prefix. Bug caught: the
    image not shown to the LLM (pixel values not passed on)."""
    from diffusers import QwenImageEditPipeline
    from PIL import Image

    pipe = QwenImageEditPipeline.from_pretrained(tiny_qwen_edit_pipeline)
    encoder = build_text_encoder(qwen_config(tiny_qwen_edit_pipeline, template=pipe.prompt_template_encode,
                                             drop_tokens=pipe.prompt_template_encode_start_idx,
                                             processor_subfolder="processor"))
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(size, generator=g) * 255).byte().numpy()) for size in ((32, 32, 3),) * 2]
    got = encoder.encode_with_images(CAPTIONS[:2], images)
    embeds, mask = pipe.encode_prompt(CAPTIONS[:2], image=images, device="cpu")
    assert got.hidden.shape == embeds.shape and (got.hidden - embeds).abs().max() < 1e-6
    assert mask is None or torch.equal(got.mask, mask.bool())
    other = [Image.fromarray(255 - (torch.rand((32, 32, 3), generator=g) * 255).byte().numpy())] * 2
    assert (encoder.encode_with_images(CAPTIONS[:2], other).hidden - got.hidden).abs().max() > 1e-3
    with pytest.raises(ValueError, match="processor_subfolder"):
        build_text_encoder(qwen_config(tiny_qwen_edit_pipeline)).encode_with_images(CAPTIONS[:1], images[:1])
