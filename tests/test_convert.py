"""Equivalence with diffusers' SD3Transformer2DModel on tiny random configs (nothing is downloaded).

diffusers is a hard dependency: if it fails to import, these tests fail (they are never skipped).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from flowmatch.encoders.conditioning import Conditioning
from flowmatch.models.convert import SD3_TIME_SCALE, from_diffusers_sd3, to_diffusers_sd3
from flowmatch.models.embeddings import sincos_pos_embed_2d
from flowmatch.models.mmdit import MMDiT
from flowmatch.models.presets import config_from_preset

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


def sample_inputs(height=8, width=8, batch=2, text_len=7, seed=1) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """(x, t, cond) with every text token real: diffusers' SD3 model takes no text mask."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 4, height, width, generator=g), torch.rand(batch, generator=g)
    hidden, pooled = torch.randn(batch, text_len, 20, generator=g), torch.randn(batch, 12, generator=g)
    return x, t, Conditioning(hidden, torch.ones(batch, text_len, dtype=torch.bool), pooled)


def reference(theirs: SD3Transformer2DModel, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """diffusers' velocity for our inputs: it takes the text tensors positionally and timestep = 1000 t."""
    return theirs(x, cond.hidden, cond.pooled, t * SD3_TIME_SCALE).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qk_norm", ["rms_norm", None])
@pytest.mark.parametrize("size", [(8, 8), (6, 14), (20, 4)])
def test_from_diffusers_matches_outputs(qk_norm, size):
    theirs = diffusers_model(qk_norm)
    ours = from_diffusers_sd3(theirs)
    assert ours.cfg.qk_norm == (qk_norm is not None)
    assert ours.joint_blocks[-1].context_pre_only
    x, t, cond = sample_inputs(*size)
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        out = ours(x, t, cond)
    assert out.shape == ref.shape == (2, 6, *size)
    assert rel_err(out, ref) < REL_TOL


def test_gradients_match_diffusers():
    theirs = diffusers_model(num_layers=2)
    ours = from_diffusers_sd3(theirs)
    x, t, cond = sample_inputs(6, 10)
    target = torch.randn(2, 6, 6, 10)
    theirs.train()
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
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
    x, t, cond = sample_inputs(10, 6)
    with torch.no_grad():
        assert rel_err(ours(x, t, cond), reference(theirs, x, t, cond)) < REL_TOL
    back = from_diffusers_sd3(theirs)
    assert back.cfg.depth == cfg.depth and back.cfg.width == cfg.width
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_saved_directory(tmp_path):
    theirs = diffusers_model(num_layers=2)
    theirs.save_pretrained(tmp_path / "transformer")
    x, t, cond = sample_inputs(8, 12)
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        # Both the transformer directory itself and a pipeline-style parent directory work.
        for path in (tmp_path / "transformer", tmp_path, str(tmp_path)):
            assert rel_err(from_diffusers_sd3(path)(x, t, cond), ref) < REL_TOL


def test_padded_text_matches_diffusers_on_the_unpadded_text():
    # Conditioning pads a batch to its longest caption; masked padding must change nothing, so the padded input
    # gives diffusers' output on the real tokens alone.
    theirs = diffusers_model(num_layers=2)
    ours = from_diffusers_sd3(theirs)
    x, t, cond = sample_inputs(8, 8, text_len=5)
    padded = cond.pad_to(9)
    padded.hidden[:, 5:] = 7.0  # nonzero padding: only the mask can hide it
    with torch.no_grad():
        assert rel_err(ours(x, t, padded), reference(theirs, x, t, cond)) < REL_TOL
        # The same tokens visible do change the output, so the check above can fail.
        visible = Conditioning(padded.hidden, torch.ones_like(padded.mask), padded.pooled)
        assert rel_err(ours(x, t, visible), reference(theirs, x, t, cond)) > 100 * REL_TOL


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
