"""MMDiT invariants on tiny configs: shapes, masking, adaLN-Zero init, checkpointing, meta init, presets, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowmatch.conditioning import Conditioning
from flowmatch.families.presets import PRESETS, config_from_preset, preset_values
from flowmatch.models.embeddings import patchify, timestep_embedding, unpatchify
from flowmatch.models.flops import count_parameters, mfu, training_flops_per_step
from flowmatch.models.layers import AdaLNModulation
from flowmatch.models.lumina2 import Lumina2
from flowmatch.models.mlp import RmsNorm
from flowmatch.models.mmdit import MMDiT, MMDiTConfig
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile
from flowmatch.models.zimage import ZImage

DIMS = dict(in_channels=4, context_dim=24, pooled_dim=12)


def tiny(**overrides) -> MMDiTConfig:
    return config_from_preset("tiny", **{**DIMS, **overrides})


def randomized(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    """A model whose zero-initialised parts are perturbed, so outputs depend on every input."""
    torch.manual_seed(seed)
    model = MMDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(cfg: MMDiTConfig, batch=2, height=8, width=8, text_len=5, seed=1, mask=None):
    """(x, t, cond) with random tensors; every text token is real unless a mask (B, text_len) is given; a
    guidance value per sample when the model embeds one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    hidden = torch.randn(batch, text_len, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool) if mask is None else mask
    extra = {"guidance": 1 + 4 * torch.rand(batch, generator=g)} if cfg.guidance_embed else {}
    return x, t, Conditioning(hidden, mask, pooled, extra)


#: FLUX.1's options at tiny size: single-stream blocks, RoPE over (image index, row, column), guidance input.
FLUX_LIKE = dict(single_blocks=2, rope=True, rope_axes_dim=[4, 6, 6], guidance_embed=True)
#: SD3.5-medium's MMDiT-X: a second, image-only attention in the first blocks.
MMDIT_X = dict(depth=3, dual_attention_layers=[0, 1])


@pytest.mark.parametrize("size", [(8, 8), (6, 12), (16, 4)])
def test_output_shape_square_and_non_square(size):
    cfg = tiny(out_channels=3)
    out = randomized(cfg)(*inputs(cfg, height=size[0], width=size[1]))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 6, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # Token 1 is the patch at row 0, column 1; features are (p_row, p_col, C).
    assert torch.equal(tokens[0, 1].reshape(2, 2, 3), x[0, :, 0:2, 2:4].permute(1, 2, 0))
    assert torch.equal(unpatchify(tokens, 3, 2, 2), x)


@pytest.mark.parametrize("variant", [dict(), FLUX_LIKE, MMDIT_X])
def test_adaln_zero_init_outputs_zero_and_blocks_are_identity(variant):
    cfg = tiny(**variant)
    model = MMDiT(cfg)
    x, t, cond = inputs(cfg)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    block = model.joint_blocks[0]
    img, txt, vec = torch.randn(2, 16, cfg.width), torch.randn(2, 5, cfg.width), torch.randn(2, cfg.width)
    out_img, out_txt = block(img, txt, vec)
    assert torch.equal(out_img, img) and torch.equal(out_txt, txt)


@pytest.mark.parametrize("variant", [dict(), dict(single_blocks=2, rope=True), FLUX_LIKE, MMDIT_X])
def test_masked_text_tokens_are_ignored(variant):
    cfg = tiny(**variant)
    model = randomized(cfg)
    x, t, cond = inputs(cfg, text_len=6)
    extra = cond.extra
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1] = False
    changed = cond.hidden.clone()
    changed[0, 4:] = 100 * torch.randn(2, cfg.context_dim)
    changed[1, 1] = -50.0
    with torch.no_grad():
        ref = model(x, t, Conditioning(cond.hidden, mask, cond.pooled, extra))
        out = model(x, t, Conditioning(changed, mask, cond.pooled, extra))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # The same change with every token visible does reach the output, so the check above can fail.
        assert not torch.allclose(model(x, t, Conditioning(changed, cond.mask, cond.pooled, extra)),
                                  model(x, t, cond), atol=1e-3)


@pytest.mark.parametrize("variant", [dict(), dict(single_blocks=2, rope=True, mask=True), {**FLUX_LIKE, "mask": True},
                                     MMDIT_X])
def test_activation_checkpointing_gives_identical_outputs_and_grads(variant):
    variant = dict(variant)
    use_mask = variant.pop("mask", False)
    cfg = tiny(**variant)
    plain, ckpt = randomized(cfg), randomized(cfg)
    apply_activation_checkpointing(ckpt)
    apply_activation_checkpointing(ckpt)  # idempotent
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    x, t, cond = inputs(cfg, mask=torch.tensor([[True] * 4 + [False], [True] * 5]) if use_mask else None)
    outs, block_calls = [], []
    for model in (plain, ckpt):
        # Count the modulation calls inside the blocks: the checkpointed model makes them again in backward.
        calls = []
        for block in model.blocks():
            for module in block.modules():
                if isinstance(module, AdaLNModulation):
                    module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(x, t, cond)
        out.square().mean().backward()
        outs.append(out.detach())
        block_calls.append(len(calls))
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert block_calls[1] == 2 * block_calls[0] > 0


def test_apply_compile_is_per_block_in_place_and_keeps_names():
    # Compiling is lazy, so this only checks the wiring; tests/test_parallelize.py runs compiled blocks.
    model = MMDiT(tiny(single_blocks=1))
    names = list(model.state_dict())
    apply_compile(apply_activation_checkpointing(model))
    assert list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.blocks())
    assert model.patch_embed._compiled_call_impl is None


def test_meta_construction_then_init_weights_matches_eager_init():
    cfg = tiny()
    eager = MMDiT(cfg)
    torch.manual_seed(3)
    eager.init_weights()
    meta = MMDiT(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (name, a), b in zip(eager.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(meta(*inputs(cfg)), torch.zeros(2, 4, 8, 8))


def test_init_weights_zeroes_modulation_and_final_layer_only():
    model = randomized(tiny())
    model.init_weights()
    for name, p in model.named_parameters():
        zero = ".mod." in name or name.startswith("final.linear") or name.endswith(".bias")
        assert (p.abs().max() == 0) == zero, name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize("variant", [dict(rope=True), dict(single_blocks=2), dict(single_blocks=1, rope=True,
                                                                                rope_axes_dim=[4, 8]),
                                     FLUX_LIKE, MMDIT_X])
def test_rope_and_single_block_variants_run_and_learn(variant):
    cfg = tiny(**variant)
    model = randomized(cfg)
    x, t, cond = inputs(cfg, height=6, width=10, mask=torch.tensor([[True, True, False, False, False], [True] * 5]))
    out = model(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("variant", [dict(), dict(single_blocks=1)])
def test_qk_norm_uses_the_configured_epsilon(variant):
    # SD3's epsilon is also timm's RmsNorm default, so only a non-default value shows that norm_eps reaches it.
    model = randomized(tiny(norm_eps=0.5, **variant))
    block = model.single_blocks[0] if variant else model.joint_blocks[0].img
    q = torch.randn(2, 5, 4, 16) * 0.3
    for norm in (block.q_norm, block.k_norm):
        torch.testing.assert_close(norm(q), torch.nn.functional.rms_norm(q, (16,), norm.weight, 0.5))


def test_last_joint_block_is_context_pre_only_without_single_blocks():
    model = MMDiT(tiny(depth=3))
    assert [b.context_pre_only for b in model.joint_blocks] == [False, False, True]
    assert not hasattr(model.joint_blocks[-1].txt, "mlp")
    assert [b.context_pre_only for b in MMDiT(tiny(depth=3, single_blocks=1)).joint_blocks] == [False] * 3


def test_timestep_embedding_stays_float32_under_bf16_autocast():
    t = torch.tensor([0.5, 0.5005]) * 1000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = timestep_embedding(t, 256)
    assert emb.dtype == torch.float32
    assert torch.equal(emb, timestep_embedding(t, 256))
    assert (emb[0] - emb[1]).abs().max() > 0.1


def test_bf16_model_runs():
    cfg = tiny()
    model = randomized(cfg).to(torch.bfloat16)
    x, t, cond = inputs(cfg)
    out = model(x.to(torch.bfloat16), t, cond.to(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    model = MMDiT(cfg)
    x, t, cond = inputs(cfg)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(x[..., :7], t, cond)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model(x[:, :3], t, cond)
    with pytest.raises(ValueError, match=r"t must be \(2,\)"):
        model(x, t[:1], cond)
    with pytest.raises(ValueError, match=r"cond.hidden must be \(2, L, 24\)"):
        model(x, t, Conditioning(cond.hidden[..., :20], cond.mask, cond.pooled))
    with pytest.raises(ValueError, match=r"cond.pooled must be \(2, 12\)"):
        model(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled[:, :8]))
    # Conditioning checks its mask when built; the model checks again what reaches it.
    float_mask = Conditioning(cond.hidden, cond.mask, cond.pooled)
    float_mask.mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="cond.mask must be bool"):
        model(x, t, float_mask)
    with pytest.raises(ValueError, match=r"cond.extra .*\['guidance', 'size'\]"):
        model(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled, {"size": torch.ones(2, 2),
                                                                       "guidance": torch.ones(2)}))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(torch.randn(1, 4, 34, 2), t[:1], Conditioning(cond.hidden[:1], cond.mask[:1], cond.pooled[:1]))


def test_the_config_checks_serve_the_mmdit_zimage_and_lumina2_alike():
    """mmdit_config's checks as each transformer reaches them. Bugs caught: a size check's `<= 0` written `< 0`,
    Z-Image's or Lumina-Image-2's own validation or input check no longer calling the shared one."""
    with pytest.raises(ValueError, match=r"MMDiTConfig.depth must be positive, got 0"):
        MMDiT(tiny(depth=0))
    zimage = config_from_preset("tiny-zimage", in_channels=4, context_dim=24)
    with pytest.raises(ValueError, match=r"MMDiTConfig.in_channels is None.*autoencoder"):
        ZImage(config_from_preset("tiny-zimage", context_dim=24))
    with pytest.raises(ValueError, match=r"MMDiTConfig.num_heads must be positive, got 0"):
        ZImage(config_from_preset("tiny-zimage", in_channels=4, context_dim=24, num_heads=0))
    for model in (ZImage(zimage), Lumina2(config_from_preset("tiny-lumina2", in_channels=4, context_dim=24))):
        x, t, cond = inputs(model.cfg, text_len=3)
        with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
            model(x[:, :3], t, cond)
        bad_mask = Conditioning(cond.hidden, cond.mask, cond.pooled)
        bad_mask.mask = torch.ones(2, 3)
        with pytest.raises(ValueError, match="cond.mask must be bool"):
            model(x, t, bad_mask)


def test_every_transformer_starts_from_xavier_linears_and_unit_norms_after_meta_construction():
    """init_weights from the meta device (to_empty leaves whatever memory held). Bugs caught: a model's
    init_weights no longer starting from layers.init_linears_and_norms (its blocks' linears left as they were),
    an RMS norm it does not reset."""
    configs = {MMDiT: tiny(), ZImage: config_from_preset("tiny-zimage", in_channels=4, context_dim=24),
               Lumina2: config_from_preset("tiny-lumina2", in_channels=4, context_dim=24)}
    for cls, cfg in configs.items():
        model = cls(cfg, device="meta")
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        norms = [m.weight for m in model.modules() if isinstance(m, RmsNorm)]
        assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms), cls.__name__
        # the first linear of the last block that init does not zero: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
        weight = next(m.weight for m in model.blocks()[-1].modules()
                      if isinstance(m, torch.nn.Linear) and m.weight.abs().max() > 0)
        bound = (6 / sum(weight.shape)) ** 0.5
        assert 0.9 * bound < weight.abs().max() <= bound, cls.__name__


def test_presets_and_their_errors():
    assert set(PRESETS) >= {"tiny", "digits", "sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell",
                            "tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large", "tiny-flux-dev",
                            "tiny-flux-schnell"}
    values = preset_values("digits")
    assert values["preset"] == "digits" and values["patch_size"] == 2 and values["in_channels"] == 1
    assert set(values) == set(MMDiTConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match=r"did you mean 'sd3-medium'.*allowed: .*tiny"):
        preset_values("sd3_medium")
    with pytest.raises(ValueError, match="did you mean 'depth'"):
        config_from_preset("tiny", deph=3)
    with pytest.raises(ValueError, match="context_dim is None.*text encoder"):
        MMDiT(config_from_preset("tiny", in_channels=4, pooled_dim=8))
    with pytest.raises(ValueError, match="rope_axes_dim"):
        MMDiT(tiny(rope=True, rope_axes_dim=[12, 12]))
    cfg = config_from_preset("tiny", **DIMS, depth=3)
    assert cfg.preset == "tiny" and cfg.depth == 3 and cfg.width == 64


def test_released_layout_options_and_their_errors():
    with pytest.raises(ValueError, match=r"dual_attention_layers=\[0, 5\] must be distinct block indices"):
        MMDiT(tiny(dual_attention_layers=[0, 5]))
    with pytest.raises(ValueError, match="last joint block.*context-pre-only"):
        MMDiT(tiny(dual_attention_layers=[1]))
    assert MMDiT(tiny(dual_attention_layers=[1], single_blocks=1)).joint_blocks[1].img.attn2 is not None
    with pytest.raises(ValueError, match="rope_axes_dim"):
        MMDiT(tiny(rope=True, rope_axes_dim=[2, 4, 4, 6]))
    cfg = tiny(**FLUX_LIKE)
    model = MMDiT(cfg)
    x, t, cond = inputs(cfg)
    with pytest.raises(ValueError, match=r"pass cond.extra\['guidance'\]"):
        model(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled))
    with pytest.raises(ValueError, match=r"cond.extra\['guidance'\] must be \(2,\)"):
        model(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled, {"guidance": torch.ones(2, 1)}))
    with pytest.raises(ValueError, match=r"does not take: \['size'\]; it takes \['guidance'\]"):
        model(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled, {**cond.extra, "size": torch.ones(2)}))
    # The guidance embedder is initialised like the timestep embedder and runs once per sample.
    assert model.guidance_embed.mlp.fc1.weight.std() < 0.05
    assert count_parameters(model).per_sample > sum(p.numel() for p in model.guidance_embed.parameters())


@pytest.mark.parametrize("name, low, high", [("sd3-medium", 1.9e9, 2.2e9), ("sd3.5-medium", 2.2e9, 2.3e9),
                                             ("sd3.5-large", 7.8e9, 8.4e9), ("flux-dev", 11.8e9, 12.0e9),
                                             ("flux-kontext-dev", 11.8e9, 12.0e9)])
def test_large_preset_parameter_counts_on_meta(name, low, high):
    model = MMDiT(config_from_preset(name), device="meta")
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert low < counts.total < high
    # SD3-medium: 24 blocks x 2 streams x 6 x 1536^2 modulation weights run once per sample.
    assert counts.per_sample > 2 * model.cfg.depth * 6 * model.cfg.width**2


@pytest.mark.parametrize("variant", [dict(single_blocks=1, interval_embed=True),
                                     dict(dual_attention_layers=[0, 1], guidance_embed=True)])
def test_flop_estimate_matches_counted_matmul_flops(variant):
    cfg = tiny(depth=3, **variant)
    model = randomized(cfg)
    x, t, cond = inputs(cfg, batch=3, height=8, width=12, text_len=7)
    # The math attention backend runs as bmm calls, which the counter sees (fused CPU kernels it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, cond).sum().backward()
    counted = counter.get_flop_counts()["Global"]
    estimate = training_flops_per_step(model, batch_size=3, latent_size=(8, 12), text_len=7)
    assert counted[torch.ops.aten.bmm] == estimate.attention
    # The estimate also counts biases, norm weights and the input gradients of the first layers, which a
    # training step does not compute: a small excess.
    assert 0.97 < counter.get_total_flops() / estimate.total < 1.0
    assert mfu(estimate.total, 2.0, estimate.total) == pytest.approx(0.5)
