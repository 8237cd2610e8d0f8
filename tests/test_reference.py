"""Reference-image conditioning (image editing): how reference latents travel in a Conditioning (caption dropout
and classifier-free guidance keep them, batches never pad them) and how the MMDiT takes them (FLUX.1 Kontext:
clean tokens after the target's with RoPE image index 1, the velocity of the target's tokens only), checked
against diffusers' FluxTransformer2DModel fed as FluxKontextPipeline feeds it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from flowmatch.conditioning import Conditioning
from flowmatch.families.convert import architecture_of, convert_diffusers
from flowmatch.flow import drop_captions
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.embeddings import rope_table
from flowmatch.models.mmdit import MMDiT
from flowmatch.sampling.guidance import guided_velocity
from tests.interop_models import (
    LATENT_CHANNELS,
    diffusers_model,
    reference as diffusers_velocity,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    rel_err,
    sample_inputs,
)

REL_TOL = 1e-5


def _cond(batch=2, text_len=3, refs=((4, 6),), seed=0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    reference = tuple(torch.randn(batch, LATENT_CHANNELS, h, w, generator=g) for h, w in refs)
    return Conditioning(torch.randn(batch, text_len, 5, generator=g), torch.ones(batch, text_len, dtype=torch.bool),
                        torch.randn(batch, 3, generator=g), reference=reference)


def _null() -> Conditioning:
    return Conditioning(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 3))


def test_caption_dropout_swaps_the_caption_and_keeps_the_references():
    cond = _cond()
    dropped = drop_captions(cond, _null(), 1.0)
    assert not dropped.mask.any() and torch.equal(dropped.pooled, torch.zeros(2, 3))
    assert len(dropped.reference) == 1 and dropped.reference[0] is cond.reference[0]


def test_the_unconditional_pass_of_guidance_sees_the_references():
    cond, seen = _cond(), []

    def model(x, t, c):
        seen.append(c)
        return x + c.reference[0].mean((1, 2, 3))[:, None, None, None] + c.pooled.sum(1)[:, None, None, None]

    v = guided_velocity(model, cond, _null(), 3.0)
    x = torch.randn(2, LATENT_CHANNELS, 4, 4)
    v(x, torch.rand(2))
    both = seen[-1]
    assert len(both) == 4 and torch.equal(both.reference[0], torch.cat([cond.reference[0]] * 2))
    assert not both.mask[2:].any()  # the second half is the empty caption


def test_batches_group_reference_counts_and_sizes_instead_of_padding():
    one, other = _cond(refs=((4, 6),)), _cond(refs=((4, 6),), seed=1)
    both = Conditioning.cat([one, other.pad_to(5)])
    assert both.length == 5 and torch.equal(both.reference[0], torch.cat([one.reference[0], other.reference[0]]))
    for mismatched in (_cond(refs=()), _cond(refs=((6, 4),)), _cond(refs=((4, 6), (4, 6)))):
        with pytest.raises(ValueError, match="same reference count and sizes"):
            Conditioning.cat([one, mismatched])
    moved = one.to(dtype=torch.float64).rows(1)
    assert moved.reference[0].dtype == torch.float64 and moved.reference[0].shape == (1, LATENT_CHANNELS, 4, 6)
    with pytest.raises(ValueError, match="reference 0 must be float latents"):
        Conditioning(one.hidden, one.mask, one.pooled, reference=(torch.zeros(3, 4, 4, 4),))


def test_reference_positions_are_kontexts_image_index_one():
    table = rope_table(2, 3, 4, head_dim=16, axes_dim=[4, 6, 6], theta=10000.0, device="cpu",
                       references=[(3, 2)])
    ids = FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32)
    ref_ids = FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32)
    ref_ids[:, 0] = 1  # FluxKontextPipeline.prepare_latents
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(torch.cat([ids, ref_ids, torch.zeros(4, 3)]))
    # diffusers repeats each angle for the two channels of a rotated pair.
    torch.testing.assert_close(table.cos[:, 0].repeat_interleave(2, dim=-1), cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(table.sin[:, 0].repeat_interleave(2, dim=-1), sin, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="image-index axis"):
        rope_table(2, 3, 4, head_dim=16, axes_dim=[8, 8], theta=10000.0, device="cpu", references=[(3, 2)])


def _kontext_pair():
    """A tiny diffusers FLUX transformer and ours on its weights, taking one reference image."""
    theirs = diffusers_model("flux-dev")
    converted = convert_diffusers(theirs)
    ours = MMDiT(dataclasses.replace(converted.cfg, references=1))
    ours.load_state_dict(converted.state_dict)
    return theirs, ours


def _kontext_inputs(text_len=7):
    x, t, cond = sample_inputs(6, 10, text_len=text_len)
    ref = torch.randn(2, LATENT_CHANNELS, 8, 4, generator=torch.Generator().manual_seed(3))
    return x, t, cond.with_reference([ref])


def test_reference_tokens_match_diffusers_kontext_forward_and_padded_text():
    theirs, ours = _kontext_pair()
    x, t, cond = _kontext_inputs(text_len=5)
    padded = cond.pad_to(9)
    padded.hidden[:, 5:] = 7.0  # nonzero padding: only the mask can hide it
    with torch.no_grad():
        ref = diffusers_velocity(theirs, x, t, cond)
        out = ours(x, t, padded)
        assert out.shape == x.shape  # the target's tokens only
        assert rel_err(out, ref) < REL_TOL
        # The reference reaches the output, at image index 1: index 0 (the target's own) gives another output.
        assert rel_err(ours(x, t, padded.with_reference([])), ref) > 100 * REL_TOL


def test_reference_tokens_match_diffusers_kontext_gradients():
    theirs, ours = _kontext_pair()
    theirs.train()
    x, t, cond = _kontext_inputs(text_len=5)
    target = torch.randn_like(x)
    (diffusers_velocity(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond.pad_to(8)) - target).square().mean().backward()  # padded text: masked, no gradient
    mapped = to_theirs({k: p.grad for k, p in ours.named_parameters()},
                       architecture_of(ours.cfg).diffusers_rules(ours.cfg))
    for name, param in theirs.named_parameters():
        assert rel_err(mapped[name], param.grad) < REL_TOL, name


def test_a_model_without_reference_support_rejects_references():
    _, ours = _kontext_pair()
    x, t, cond = _kontext_inputs()
    plain = MMDiT(dataclasses.replace(ours.cfg, references=0))
    with pytest.raises(ValueError, match=r"1 reference image\(s\); this MMDiT takes at most 0"):
        plain(x, t, cond)
    with pytest.raises(ValueError, match="needs rope with three rope_axes_dim"):
        dataclasses.replace(ours.cfg, references=1, rope=False).validate()
