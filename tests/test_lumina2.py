"""The Lumina-Image-2 family against diffusers' Lumina2Transformer2DModel on tiny random configs (nothing
downloaded): forward and every weight's gradient with padded text, weights both ways bitwise, the original
single-file keys both ways (and through diffusers' own single-file converter), and the parameter count at the
released shape."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.config import recipe_from_dict
from flowmatch.errors import RecipeError
from flowmatch.families import family_of
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import convert_diffusers, from_diffusers, from_original, to_diffusers, to_original
from flowmatch.families.lumina2 import FAMILY as lumina2_family
from flowmatch.families.lumina2 import convert as lumina2
from flowmatch.families.presets import config_from_preset, preset_values
from flowmatch.init_from import with_architecture
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.flops import counted_training_flops_per_step
from flowmatch.models.lumina2 import Lumina2, lumina2_rope
from tests.interop_models import (
    LATENT_CHANNELS,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    rel_err,
)

CONTEXT_DIM = 20
REL_TOL = 1e-5


def lumina2_model(seed: int = 0, **overrides) -> Lumina2Transformer2DModel:
    """A tiny random Lumina2Transformer2DModel with grouped key/value heads, every weight perturbed (so all of them
    reach the output)."""
    torch.manual_seed(seed)
    kwargs = dict(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=64, num_layers=2,
                  num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                  axes_dim_rope=(4, 6, 6), cap_feat_dim=CONTEXT_DIM)
    model = Lumina2Transformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(height=8, width=6, batch=3, text_len=7, seed=1) -> tuple[Tensor, Tensor, Conditioning]:
    """(x, t, cond) with the second caption padded after 3 tokens and the third after 5 (padding hidden states
    random: never read)."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g), torch.rand(batch, generator=g)
    hidden = torch.randn(batch, text_len, CONTEXT_DIM, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 5:] = False
    return x, t, Conditioning(hidden, mask, torch.zeros(batch, 0))


def reference(theirs: Lumina2Transformer2DModel, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """diffusers' velocity for our inputs, as Lumina2Pipeline calls it: timestep 1 - t, the prediction negated."""
    return -theirs(x, 1 - t, cond.hidden, cond.mask, return_dict=False)[0]


def test_forward_with_padded_text_matches_diffusers():
    theirs = lumina2_model()
    ours = from_diffusers(theirs)
    assert family_of(ours.cfg).name == "lumina2" and isinstance(ours, Lumina2)
    x, t, cond = inputs()
    with torch.no_grad():
        ref, out = reference(theirs, x, t, cond), ours(x, t, cond)
        # a padded caption gives what its valid tokens alone give
        short = Conditioning(cond.hidden[1:2, :3], cond.mask[1:2, :3], cond.pooled[1:2], all_valid=True)
        alone = ours(x[1:2], t[1:2], short)
    assert out.shape == ref.shape == x.shape
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(out[1:2], alone) < REL_TOL


def test_unpadded_text_passes_no_mask_and_matches_diffusers(monkeypatch):
    theirs = lumina2_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    full = Conditioning(cond.hidden, torch.ones_like(cond.mask), cond.pooled, all_valid=True)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    with torch.no_grad():
        ref = reference(theirs, x, t, full)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = ours(x, t, full)
    assert rel_err(out, ref) < REL_TOL
    assert len(masks) == 4 and all(m is None for m in masks)


def test_a_caption_with_no_valid_token_gives_finite_outputs_and_gradients():
    ours = from_diffusers(lumina2_model())
    x, t, cond = inputs()
    # a caption with no valid token: its caption queries see no key in the context refiner (SDPA's rows of zeros,
    # never NaN, on the backend this runs on), its image attends to itself alone
    cond.mask[0] = False
    out = ours(x, t, cond)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_gradients_of_every_weight_match_diffusers():
    theirs = lumina2_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    target = torch.randn_like(x)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
    grads = to_theirs({k: p.grad for k, p in ours.named_parameters()}, lumina2.diffusers_rules(ours.cfg))
    named = dict(theirs.named_parameters())
    assert set(grads) == set(named)
    worst = max(rel_err(grads[k], named[k].grad) for k in named)
    assert worst < REL_TOL, worst


def test_weights_both_ways_are_bitwise():
    theirs = lumina2_model()
    back = to_diffusers(from_diffusers(theirs))
    assert type(back) is Lumina2Transformer2DModel
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.config.items() if not k.startswith("_")}
    sd, back_sd = theirs.state_dict(), back.state_dict()
    assert set(sd) == set(back_sd) and all(torch.equal(sd[k], back_sd[k]) for k in sd)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_keys_load_in_diffusers_and_round_trip_bitwise(prefix):
    theirs = lumina2_model()
    ours = from_diffusers(theirs)
    original = {prefix + k: v for k, v in to_original(ours, prefix="").items()}
    assert {"layers.0.attention.qkv.weight", "norm_final.weight"} <= {k[len(prefix):] for k in original}
    # diffusers' own single-file converter reads our original keys into its layout, tensor for tensor (it
    # hard-codes the release's query and key/value widths, 2304 and 768: the tiny ones are put in their place)
    # (with the un-prefixed keys: its prefix removal renames keys it then looks up by their old names)
    converted = _diffusers_single_file(ours)({k[len(prefix):]: v for k, v in original.items()})
    sd = theirs.state_dict()
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    again_model = from_original(original, head_dim=ours.cfg.head_dim, rope_axes_dim=[4, 6, 6], ffn_multiple_of=16)
    assert family_of(again_model.cfg).name == "lumina2" and again_model.cfg.kv_heads == 2
    again = to_original(again_model, prefix="")
    assert set(again) == {k[len(prefix):] for k in original}
    assert all(torch.equal(again[k], original[prefix + k]) for k in again)


def _diffusers_single_file(ours: Lumina2):
    source = inspect.getsource(convert_lumina2_to_diffusers)
    assert "q_dim = 2304" in source and "k_dim = v_dim = 768" in source
    kv = ours.cfg.kv_heads * ours.cfg.head_dim
    namespace = dict(vars(single_file_utils))
    exec(source.replace("q_dim = 2304", f"q_dim = {ours.cfg.width}").replace(  # noqa: S102
        "k_dim = v_dim = 768", f"k_dim = v_dim = {kv}"), namespace)
    return namespace["convert_lumina2_to_diffusers"]


def test_released_parameter_count_equals_diffusers_on_meta():
    cfg = config_from_preset("lumina2")
    with torch.device("meta"):
        theirs = Lumina2Transformer2DModel(**lumina2.diffusers_config(cfg))
        ours = Lumina2(cfg)
        default = Lumina2Transformer2DModel(cap_feat_dim=2304)  # diffusers' defaults are the release's shape
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs == sum(p.numel() for p in default.parameters())
    assert 2.5e9 < n_theirs < 2.7e9
    assert convert_diffusers(lumina2_model()).cfg.preset == "custom"


def test_tiny_preset_starts_at_zero_and_exports():
    cfg = config_from_preset("tiny-lumina2", in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM)
    ours = Lumina2(cfg)
    x, t, cond = inputs()
    assert torch.count_nonzero(ours(x, t, cond)) == 0  # zero final layer
    theirs = to_diffusers(ours)
    assert type(theirs) is Lumina2Transformer2DModel and theirs.config.num_kv_heads == 2


def test_rope_puts_image_tokens_after_each_caption():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    table = lumina2_rope(mask, 2, 2, axes_dim=[2, 2, 2], theta=10000.0)
    # axis 0 (one frequency, 1.0): captions at 0, 1, 2; the image at the caption's valid length
    first = torch.atan2(table.sin[:, :, 0, 0], table.cos[:, :, 0, 0])
    assert torch.allclose(first, torch.tensor([[0.0, 1, 2, 3, 3, 3, 3], [0, 1, 2, 1, 1, 1, 1]]))
    rows = torch.atan2(table.sin[0, :, 0, 1], table.cos[0, :, 0, 1])
    assert torch.allclose(rows, torch.tensor([0.0, 0, 0, 0, 0, 1, 1]))


@pytest.mark.parametrize("preset, latent, text_len, rel", [("tiny-lumina2", (8, 6), 5, 0.02),
                                                          ("lumina2", (128, 128), 256, 1e-3)])
def test_flop_count_agrees_with_flop_counter_mode(preset, latent, text_len, rel):
    """Bugs caught: a block list left out of the count (the refiners), the joint blocks' attention over the
    image tokens alone, the grouped key/value projections counted at the query width."""
    cfg = config_from_preset(preset, in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM)
    with torch.device("meta"):
        model = Lumina2(cfg)
        cond = Conditioning(torch.zeros(1, text_len, CONTEXT_DIM), torch.ones(1, text_len, dtype=torch.bool),
                            torch.zeros(1, 0), all_valid=True)
        inputs = (torch.zeros(1, LATENT_CHANNELS, *latent), torch.full((1,), 0.5), cond)
    counted = counted_training_flops_per_step(model, inputs, batch_size=4)
    assert lumina2_family.flops(cfg, batch_size=4, latent_size=latent, text_len=text_len) == pytest.approx(
        counted, rel=rel)


def test_a_recipe_whose_encoders_lumina2_cannot_take_names_both():
    """Lumina-Image-2 reads no pooled vector: a CLIP beside its text encoder is refused, naming the family and the
    encoder."""
    flux_text = {"combine": "flux", "encoders": {
        "clip_l": {"kind": "clip", "padding": "max_length", "max_length": 77, "pooling": "pooler"},
        "t5": {"kind": "t5", "padding": "max_length", "max_length": 512}}}
    with pytest.raises(RecipeError, match=r"model.family: lumina2 takes no pooled text vector.*clip_l \(kind clip\)"):
        recipe_from_dict({"model": {"preset": "tiny-lumina2"}, "text_encoders": flux_text})


def test_weights_of_another_family_are_refused_as_lumina2_and_back():
    lumina2_weights = convert_diffusers(lumina2_model()).cfg
    flux_model = ModelConfig(**{**preset_values("tiny-flux-schnell"), "family": "flux", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: flux.*holds lumina2 weights"):
        with_architecture(flux_model, lumina2_weights)
    flux_weights = config_from_preset("tiny-flux-schnell", in_channels=4, context_dim=20, pooled_dim=12)
    lumina2_cfg = ModelConfig(**{**preset_values("tiny-lumina2"), "family": "lumina2", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: lumina2.*holds flux weights"):
        with_architecture(lumina2_cfg, flux_weights)
    assert with_architecture(lumina2_cfg, lumina2_weights).kv_heads == 2
