"""Qwen-Image against diffusers' QwenImageTransformer2DModel on tiny random configs (nothing is downloaded):
outputs with padded text, every weight's gradient, MSRoPE's angles, weights both ways bit for bit, and the
released shape's parameter count on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from flowmatch.conditioning import Conditioning
from flowmatch.families import family_of
from flowmatch.families.convert import architecture_of, from_diffusers, to_diffusers
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.embeddings import msrope_table
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import one_thread, rel_err  # noqa: F401 - one_thread applies the module-wide fixture

#: The brief's bar for the transformer: outputs and gradients to a relative 1e-5.
REL_TOL = 1e-5
CONTEXT_DIM, LATENT_CHANNELS = 20, 4
#: The VAE factor diffusers' (un)packing helpers take; it only sizes their reshapes.
VAE_FACTOR = 8


def diffusers_qwen(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    """A tiny random QwenImageTransformer2DModel, every weight (the zero-initialised ones too) perturbed."""
    torch.manual_seed(seed)
    kwargs = dict(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
                  attention_head_dim=16, num_attention_heads=3, joint_attention_dim=CONTEXT_DIM,
                  axes_dims_rope=(8, 4, 4))
    model = QwenImageTransformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(height=6, width=10, batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g), torch.rand(batch, generator=g)
    hidden = torch.randn(batch, text_len, CONTEXT_DIM, generator=g)
    return x, t, Conditioning(hidden, torch.ones(batch, text_len, dtype=torch.bool), torch.zeros(batch, 0))


def reference(theirs, x, t, cond: Conditioning):
    """diffusers' velocity for our inputs: 2x2-packed latents, the text mask, t itself (it embeds t * 1000) and
    the packed grid's shape, unpacked back to (B, C, H, W)."""
    b, c, h, w = x.shape
    packed = theirs(QwenImagePipeline._pack_latents(x, b, c, h, w), cond.hidden, cond.mask, t,
                    img_shapes=[[(1, h // 2, w // 2)]] * b).sample
    return QwenImagePipeline._unpack_latents(packed, h * VAE_FACTOR, w * VAE_FACTOR, VAE_FACTOR)[:, :, 0]


@pytest.mark.parametrize("size", [(6, 10), (8, 8), (12, 4)])
def test_outputs_match_diffusers(size):
    theirs = diffusers_qwen()
    ours = from_diffusers(theirs)
    assert family_of(ours.cfg).name == "qwen_image" and ours.pooled_embed is None
    x, t, cond = inputs(*size)
    with torch.no_grad():
        ref, out = reference(theirs, x, t, cond), ours(x, t, cond)
    assert out.shape == ref.shape == x.shape
    assert rel_err(out, ref) < REL_TOL


def test_padded_text_matches_diffusers_on_the_unpadded_text():
    """Bugs caught: padding visible to attention, text RoPE positions shifted by padding, txt_norm skipped."""
    theirs = diffusers_qwen()
    ours = from_diffusers(theirs)
    x, t, cond = inputs(text_len=5)
    padded = cond.pad_to(9)
    padded.hidden[:, 5:] = 7.0  # nonzero padding: only the mask can hide it
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        assert rel_err(ours(x, t, padded), ref) < REL_TOL
        # diffusers given the same padded batch and mask agrees too (its mask path).
        assert rel_err(ours(x, t, padded), reference(theirs, x, t, padded)) < REL_TOL
        visible = Conditioning(padded.hidden, torch.ones_like(padded.mask), padded.pooled)
        assert rel_err(ours(x, t, visible), ref) > 100 * REL_TOL


def test_gradients_of_every_weight_match_diffusers():
    theirs = diffusers_qwen().train()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    cond = cond.pad_to(9)
    target = torch.randn_like(x)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
    rules = architecture_of(ours.cfg).diffusers_rules(ours.cfg)
    ours_grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in ours.named_parameters()}
    mapped = to_theirs(ours_grads, rules)
    unused = []
    for name, param in theirs.named_parameters():
        if param.grad is None or param.grad.abs().max() == 0:  # the last block's text outputs feed nothing
            assert mapped[name].abs().max() == 0, name
            unused.append(name)
        else:
            assert rel_err(mapped[name], param.grad) < REL_TOL, name
    # The last block's text queries, their norm, output projection and MLP: in both models, nothing reads them.
    assert all(name.startswith("transformer_blocks.1.") for name in unused) and len(unused) == 9, unused


def test_msrope_angles_match_diffusers():
    """Bugs caught: the image grid not centred, the text off the diagonal or starting at max(h, w) instead of
    max(h // 2, w // 2). (torch.polar and cos / sin may differ by an ulp.)"""
    axes = [8, 4, 4]
    for h, w, text in ((3, 5, 7), (4, 4, 2), (6, 1, 3)):
        img, txt = QwenEmbedRope(10000, axes, scale_rope=True)([(1, h, w)], device="cpu", max_txt_seq_len=text)
        theirs = torch.cat([img, txt])  # (S, 8) complex
        ours = msrope_table(h, w, text, head_dim=16, axes_dim=axes, theta=10000.0, device="cpu")
        assert ours.cos.shape == (h * w + text, 1, 8)
        torch.testing.assert_close(ours.cos[:, 0], theirs.real, rtol=0, atol=2e-7)
        torch.testing.assert_close(ours.sin[:, 0], theirs.imag, rtol=0, atol=2e-7)


def test_diffusers_round_trip_is_bitwise_both_ways():
    theirs = diffusers_qwen()
    back = to_diffusers(from_diffusers(theirs))
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (theirs, back)]
    assert type(back) is QwenImageTransformer2DModel and public[0] == public[1]
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    torch.manual_seed(0)
    ours = MMDiT(config_from_preset("tiny-qwen-image", in_channels=4, context_dim=CONTEXT_DIM))
    again = from_diffusers(to_diffusers(ours))
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_released_shape_has_diffusers_parameter_count():
    cfg = config_from_preset("qwen-image")
    with torch.device("meta"):
        theirs = QwenImageTransformer2DModel(**architecture_of(cfg).diffusers_config(cfg))
    ours = MMDiT(cfg, device="meta")
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 20.0e9 < count < 20.6e9


def test_unsupported_variants_raise():
    with pytest.raises(ValueError, match="zero_cond_t"):
        from_diffusers(diffusers_qwen(zero_cond_t=True))


def test_reference_tokens_match_diffusers_fed_as_the_edit_pipeline_feeds_it():
    """Qwen-Image-Edit's use of the transformer: the clean reference latents packed after the target's, each image
    its own centred MSRoPE grid at frame 1, 2, ..., the velocity of the target's tokens only. Bugs caught: the
    reference at frame 0, its grid not centred, the text not past the largest grid."""
    import dataclasses

    theirs = diffusers_qwen()
    converted = from_diffusers(theirs)
    ours = MMDiT(dataclasses.replace(converted.cfg, references=1))
    ours.load_state_dict(converted.state_dict())
    x, t, cond = inputs(6, 10)
    ref = torch.randn(2, LATENT_CHANNELS, 10, 8, generator=torch.Generator().manual_seed(3))
    b, c, h, w = x.shape
    packed = torch.cat([QwenImagePipeline._pack_latents(x, b, c, h, w),
                        QwenImagePipeline._pack_latents(ref, b, c, 10, 8)], dim=1)
    with torch.no_grad():
        out = theirs(packed, cond.hidden, cond.mask, t, img_shapes=[[(1, h // 2, w // 2), (1, 5, 4)]] * b).sample
        want = QwenImagePipeline._unpack_latents(out[:, :h * w // 4], h * VAE_FACTOR, w * VAE_FACTOR,
                                                 VAE_FACTOR)[:, :, 0]
        got = ours(x, t, cond.pad_to(9).with_reference([ref]))
    assert rel_err(got, want) < REL_TOL
    axes = [8, 4, 4]
    img, txt = QwenEmbedRope(10000, axes, scale_rope=True)([[(1, 3, 5), (1, 7, 2)]], device="cpu", max_txt_seq_len=4)
    table = msrope_table(3, 5, 4, head_dim=16, axes_dim=axes, theta=10000.0, device="cpu", references=[(7, 2)])
    torch.testing.assert_close(table.cos[:, 0], torch.cat([img, txt]).real, rtol=0, atol=2e-7)
    torch.testing.assert_close(table.sin[:, 0], torch.cat([img, txt]).imag, rtol=0, atol=2e-7)
