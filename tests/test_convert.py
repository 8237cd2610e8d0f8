"""Equivalence with diffusers' SD3Transformer2DModel on tiny random configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

from flowmatch.models.convert import from_diffusers_sd3, to_diffusers_sd3  # noqa: E402
from flowmatch.models.embeddings import sincos_pos_embed_2d  # noqa: E402
from flowmatch.models.mmdit import MMDiT  # noqa: E402
from flowmatch.models.presets import config_from_preset  # noqa: E402

REL_TOL = 1e-4


def diffusers_model(qk_norm="rms_norm", num_layers=3, seed=0, **overrides) -> SD3Transformer2DModel:
    """A tiny SD3 transformer with all weights (zero-initialised ones included) randomised."""
    torch.manual_seed(seed)
    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=20, caption_projection_dim=32, pooled_projection_dim=12,
                  out_channels=6, pos_embed_max_size=12, qk_norm=qk_norm)
    model = SD3Transformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def sample_inputs(height=8, width=8, batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, text_len, 20, generator=g), torch.randn(batch, 12, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qk_norm", ["rms_norm", None])
@pytest.mark.parametrize("size", [(8, 8), (6, 14), (20, 4)])
def test_from_diffusers_matches_outputs(qk_norm, size):
    theirs = diffusers_model(qk_norm)
    ours = from_diffusers_sd3(theirs)
    assert ours.cfg.qk_norm == (qk_norm is not None)
    assert ours.joint_blocks[-1].context_pre_only
    x, t, ctx, pooled = sample_inputs(*size)
    with torch.no_grad():
        ref = theirs(x, ctx, pooled, t * 1000).sample
        out = ours(x, t, ctx, pooled)
    assert out.shape == ref.shape == (2, 6, *size)
    assert rel_err(out, ref) < REL_TOL


def test_gradients_match_diffusers():
    theirs = diffusers_model(num_layers=2)
    ours = from_diffusers_sd3(theirs)
    x, t, ctx, pooled = sample_inputs(6, 10)
    target = torch.randn(2, 6, 6, 10)
    theirs.train()
    (theirs(x, ctx, pooled, t * 1000).sample - target).square().mean().backward()
    (ours(x, t, ctx, pooled) - target).square().mean().backward()
    attn = theirs.transformer_blocks[0].attn
    ref_qkv = torch.cat([attn.to_q.weight.grad, attn.to_k.weight.grad, attn.to_v.weight.grad])
    assert rel_err(ours.joint_blocks[0].img.qkv.weight.grad, ref_qkv) < REL_TOL
    assert rel_err(ours.context_embed.weight.grad, theirs.context_embedder.weight.grad) < REL_TOL
    ref_time = theirs.time_text_embed.timestep_embedder.linear_1.weight.grad
    assert rel_err(ours.time_embed.mlp.fc1.weight.grad, ref_time) < REL_TOL


@pytest.mark.parametrize("qk_norm", [True, False])
def test_to_diffusers_matches_outputs_and_round_trips(qk_norm):
    torch.manual_seed(0)
    cfg = config_from_preset("tiny", in_channels=4, context_dim=20, pooled_dim=12, depth=3, qk_norm=qk_norm)
    ours = MMDiT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    theirs = to_diffusers_sd3(ours)
    assert theirs.config.qk_norm == ("rms_norm" if qk_norm else None)
    x, t, ctx, pooled = sample_inputs(10, 6)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx, pooled), theirs(x, ctx, pooled, t * 1000).sample) < REL_TOL
    back = from_diffusers_sd3(theirs)
    assert back.cfg.depth == cfg.depth and back.cfg.width == cfg.width
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_saved_directory(tmp_path):
    theirs = diffusers_model(num_layers=2)
    theirs.save_pretrained(tmp_path / "transformer")
    x, t, ctx, pooled = sample_inputs(8, 12)
    with torch.no_grad():
        ref = theirs(x, ctx, pooled, t * 1000).sample
        # Both the transformer directory itself and a pipeline-style parent directory work.
        for path in (tmp_path / "transformer", tmp_path, str(tmp_path)):
            assert rel_err(from_diffusers_sd3(path)(x, t, ctx, pooled), ref) < REL_TOL


def test_position_embedding_matches_diffusers_crops():
    theirs = diffusers_model(num_layers=1)
    for height, width in [(8, 8), (6, 14), (24, 2)]:
        ref = theirs.pos_embed.cropped_pos_embed(height, width)[0]
        ours = sincos_pos_embed_2d(height // 2, width // 2, 32, base_size=4, max_size=12, device=torch.device("cpu"))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_unsupported_variants_raise():
    with pytest.raises(ValueError, match="dual_attention_layers"):
        from_diffusers_sd3(diffusers_model(num_layers=2, dual_attention_layers=(0,)))
    cfg = config_from_preset("tiny", in_channels=4, context_dim=20, pooled_dim=12, rope=True)
    with pytest.raises(ValueError, match="'rope': True"):
        to_diffusers_sd3(MMDiT(cfg))
