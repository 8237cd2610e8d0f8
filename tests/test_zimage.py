"""The Z-Image family against diffusers' ZImageTransformer2DModel on tiny random configs (nothing downloaded):
forward and every weight's gradient with padded text of several lengths (diffusers takes per-sample lists),
weights both ways bitwise, the single-file keys diffusers' loader reads, and the parameter count at the released
shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.config import recipe_from_dict
from flowmatch.engine.state import write_safetensors
from flowmatch.errors import RecipeError
from flowmatch.families import family_of
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import convert_diffusers, from_diffusers, from_original, to_diffusers, to_original
from flowmatch.families.lora import apply_lora, load_lora_file
from flowmatch.families.presets import config_from_preset, preset_values
from flowmatch.families.zimage import convert as zimage
from flowmatch.init_from import with_architecture
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.convert.lora import to_lora_file
from flowmatch.models.flops import counted_training_flops_per_step
from flowmatch.models.lora import LoraConfig, is_adapter
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import one_thread, rel_err  # noqa: F401 - one_thread applies the module-wide fixture

CONTEXT_DIM = 20
CHANNELS = 4
REL_TOL = 1e-5


def zimage_model(seed: int = 0, **overrides) -> ZImageTransformer2DModel:
    """A tiny random ZImageTransformer2DModel, every weight perturbed (pad tokens and zero-initialised layers
    included, so all of them reach the output)."""
    torch.manual_seed(seed)
    kwargs = dict(in_channels=CHANNELS, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                  cap_feat_dim=CONTEXT_DIM, axes_dims=[4, 6, 6])
    model = ZImageTransformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(height=8, width=6, text_len=37, seed=1) -> tuple[Tensor, Tensor, Conditioning]:
    """(x, t, cond) for 3 samples: a full caption (37 tokens: padded to 64 by pad tokens), one of 3 tokens (to 32)
    and one of 33 (to 64); the masked states are random, never read."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, CHANNELS, height, width, generator=g), torch.rand(3, generator=g)
    mask = torch.ones(3, text_len, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 33:] = False
    return x, t, Conditioning(torch.randn(3, text_len, CONTEXT_DIM, generator=g), mask, torch.zeros(3, 0))


def reference(theirs: ZImageTransformer2DModel, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """diffusers' prediction as flowmatch's velocity: ZImagePipeline's inputs (a list of (C, 1, H, W) latents,
    its time 1 - t, each caption's valid states alone) and its output negated."""
    out = theirs(list(x[:, :, None]), 1.0 - t, [h[m] for h, m in zip(cond.hidden, cond.mask)]).sample
    return -torch.stack(out)[:, :, 0]


def test_forward_with_padded_text_matches_diffusers():
    theirs = zimage_model()
    ours = from_diffusers(theirs)
    assert family_of(ours.cfg).name == "zimage"
    x, t, cond = inputs()
    with torch.no_grad():
        ref, out = reference(theirs, x, t, cond), ours(x, t, cond)
        # a sample alone with its valid tokens only (no padding: no mask) gives its row of the batch
        short = Conditioning(cond.hidden[1:2, :3], cond.mask[1:2, :3], cond.pooled[1:2], all_valid=True)
        alone = ours(x[1:2], t[1:2], short)
        # the padded tokens are read by nothing: changing them changes nothing
        noisy = Conditioning(torch.where(cond.mask[..., None], cond.hidden, 7.0), cond.mask, cond.pooled)
        moved = ours(x, t, noisy)
        # padding first (its valid tokens in order after it) reads as the same caption
        left = Conditioning(cond.hidden[1:2].roll(5, 1), cond.mask[1:2].roll(5, 1), cond.pooled[1:2])
        left_out = ours(x[1:2], t[1:2], left)
    assert out.shape == ref.shape == x.shape
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(out[1:2], alone) < REL_TOL
    assert torch.equal(moved, out)
    assert rel_err(left_out, out[1:2]) < REL_TOL


def test_unpadded_text_matches_diffusers_with_no_mask_and_an_odd_image():
    theirs = zimage_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs(height=6, width=10, text_len=32)  # 15 image tokens: image pad tokens too
    full = Conditioning(cond.hidden, torch.ones_like(cond.mask), cond.pooled, all_valid=True)
    with torch.no_grad():
        assert rel_err(ours(x, t, full), reference(theirs, x, t, full)) < REL_TOL


def test_gradients_of_every_weight_match_diffusers():
    theirs = zimage_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    target = torch.randn_like(x)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
    grads = to_theirs({k: p.grad for k, p in ours.named_parameters()}, zimage.diffusers_rules(ours.cfg))
    named = dict(theirs.named_parameters())
    assert set(grads) == set(named)
    worst = max(rel_err(grads[k], named[k].grad) for k in named)
    assert worst < REL_TOL, worst


def test_weights_both_ways_are_bitwise():
    theirs = zimage_model()
    back = to_diffusers(from_diffusers(theirs))
    assert type(back) is ZImageTransformer2DModel
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (theirs, back)]
    assert public[0] == public[1]
    sd, back_sd = theirs.state_dict(), back.state_dict()
    assert set(sd) == set(back_sd) and all(torch.equal(sd[k], back_sd[k]) for k in sd)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_keys_load_in_diffusers_and_round_trip_bitwise(prefix):
    theirs = zimage_model()
    ours = from_diffusers(theirs)
    original = {prefix + k: v for k, v in to_original(ours, prefix="").items()}
    assert "layers.0.attention.qkv.weight" in {k[len(prefix):] for k in original}
    # diffusers' own single-file converter reads our original keys into its layout, tensor for tensor
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    sd = theirs.state_dict()
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    back = from_original(original, rope_axes_dim=[4, 6, 6])
    assert family_of(back.cfg).name == "zimage"
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_parameter_count_equals_diffusers_at_the_released_shape():
    with torch.device("meta"):
        theirs = ZImageTransformer2DModel()  # its defaults are Z-Image(-Turbo)'s
        ours = family_of(config_from_preset("zimage")).build(config_from_preset("zimage"))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 6_154_908_736
    assert zimage.config_from_diffusers(theirs.config) == config_from_preset("zimage", preset="custom")


def test_flop_count_equals_flop_counter_mode_at_the_released_shape():
    """Bugs caught: a term left out of the count (the refiners, their padded lengths, the attention of padded
    sequences), measured against FlopCounterMode's independent count of one meta-device forward."""
    cfg = config_from_preset("zimage")
    family = family_of(cfg)
    height, width, text_len = 94, 80, 300  # 1880 image tokens padded to 1888, text to 320 tokens
    with torch.device("meta"):
        model = family.build(cfg)
        cond = Conditioning(torch.zeros(1, text_len, cfg.context_dim), torch.ones(1, text_len, dtype=torch.bool),
                            torch.zeros(1, 0), all_valid=True)
        counted = counted_training_flops_per_step(
            model, (torch.zeros(1, cfg.in_channels, height, width), torch.full((1,), 0.5), cond), batch_size=2)
    assert family.flops(cfg, batch_size=2, latent_size=(height, width), text_len=text_len) == pytest.approx(
        counted, rel=1e-9)  # both count every matmul exactly


def test_bad_input_names_the_family_and_what_it_cannot_take():
    # a CLIP encoder, whose only share is a pooled vector, beside the decoder LLM: refused naming both
    text = {"combine": "single", "encoders": {"clip_l": {"kind": "clip", "padding": "max_length", "max_length": 77,
                                                         "pooling": "pooler"}}}
    with pytest.raises(RecipeError, match=r"model.family: zimage takes no pooled text vector.*clip_l \(kind clip\)"):
        recipe_from_dict({"model": {"preset": "tiny-zimage"}, "text_encoders": text})
    # weights of one family loaded as another: refused naming both, either way
    zimage_weights = convert_diffusers(zimage_model()).cfg
    flux_model = ModelConfig(**{**preset_values("tiny-flux-schnell"), "family": "flux", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: flux.*holds zimage weights"):
        with_architecture(flux_model, zimage_weights)
    zimage_cfg = ModelConfig(**{**preset_values("tiny-zimage"), "family": "zimage", "init_from": "w/"})
    flux_weights = config_from_preset("tiny-flux-schnell", in_channels=4, context_dim=20, pooled_dim=12)
    with pytest.raises(RecipeError, match=r"model.family: zimage.*holds flux weights"):
        with_architecture(zimage_cfg, flux_weights)
    assert with_architecture(zimage_cfg, zimage_weights).refiner_layers == 1
    # the MMDiT refuses Z-Image's layout, and Z-Image what it does not have, each naming the field
    with pytest.raises(ValueError, match="rope_layout='zimage'"):
        MMDiT(zimage_weights)
    with pytest.raises(ValueError, match="pooled_dim"):
        family_of(zimage_weights).build(dataclasses.replace(zimage_weights, pooled_dim=12))


def test_every_lora_format_reads_back_bit_for_bit(tmp_path):
    """Bugs caught: the fused q, k, v rows written in another order than read, the shared A of the split diffusers
    modules not recognised, alpha lost, the single file's module names (attention.qkv, attention.out) not used by
    kohya's layout (nor read from ComfyUI files on the release's modules), ComfyUI's written on them (diffusers'
    Z-Image converter then applies only part of the file: tests/test_lora_formats.py's check rows)."""
    cfg = convert_diffusers(zimage_model()).cfg
    family, lora = family_of(cfg), LoraConfig(rank=3, alpha=7.0)  # alpha != rank: a lost scale shows

    def adapted(seed):
        model = family.build(cfg)
        torch.manual_seed(0)
        chosen = apply_lora(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_adapter(name):
                    p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(name))))
        return model, chosen, {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter(k)}

    _, chosen, want = adapted(1)
    assert set(family.lora_formats) == {"diffusers", "comfyui", "kohya", "comfyui-release"}
    for name, fmt in family.lora_formats.items():
        tensors, metadata = to_lora_file(want, chosen, lora, fmt, cfg)
        fused = any(".attention.qkv." in k or "_attention_qkv." in k for k in tensors)
        assert fused == (name in ("kohya", "comfyui-release")), name
        assert fmt.writes == (name != "comfyui-release"), name
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, tensors, metadata)
        model, _, _ = adapted(2)
        assert load_lora_file(model, lora, str(path)) == name
        got = {k: v for k, v in model.state_dict().items() if is_adapter(k)}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
