"""The FLUX.2 family against diffusers' Flux2Transformer2DModel on tiny random configs (nothing downloaded):
forward and every weight's gradient with padded text, weights both ways bitwise, the release's original
single-file keys both ways (through diffusers' own single-file converter), the RoPE table, and the parameter
counts at the released shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.families import family_of
from flowmatch.families.convert import convert_diffusers, from_diffusers, from_original, to_diffusers, to_original
from flowmatch.families.flux2 import convert as flux2
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.embeddings import flux2_rope_table
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import LATENT_CHANNELS, one_thread, rel_err  # noqa: F401 - applies the fixture

CONTEXT_DIM = 20
REL_TOL = 1e-5


def flux2_model(seed: int = 0, guidance: bool = True, **overrides) -> Flux2Transformer2DModel:
    """A tiny random Flux2Transformer2DModel, every weight perturbed (so all of them reach the output)."""
    torch.manual_seed(seed)
    kwargs = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=CONTEXT_DIM,
                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)
    model = Flux2Transformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(height=8, width=6, batch=2, text_len=7, seed=1, padded=True) -> tuple[Tensor, Tensor, Conditioning]:
    """(x, t, cond) with, when ``padded``, the second caption padded after 3 tokens; guidance values in extra."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g), torch.rand(batch, generator=g)
    hidden = torch.randn(batch, text_len, CONTEXT_DIM, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    if padded:
        mask[1, 3:] = False
    guidance = 1 + 4 * torch.rand(batch, generator=g)
    return x, t, Conditioning(hidden, mask, torch.zeros(batch, 0), {"guidance": guidance})


def reference(theirs: Flux2Transformer2DModel, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """diffusers' velocity for our inputs, laid out as Flux2KleinPipeline lays them: patchified and packed
    latents, ids (0, row, column, 0) and (0, 0, 0, n), t itself (it multiplies by 1000), the guidance value for a
    model that embeds it, and the text mask (when any) as a bool [text, image] attention mask."""
    b, c, h, w = x.shape
    patches = Flux2KleinPipeline._patchify_latents(x)  # (B, 4C, h/2, w/2)
    tokens = Flux2KleinPipeline._pack_latents(patches)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(patches)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(cond.hidden)
    kwargs = {}
    if not cond.all_valid:
        mask = torch.cat([cond.mask, torch.ones(b, tokens.shape[1], dtype=torch.bool)], dim=1)
        kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
    guidance = cond.extra["guidance"] if theirs.config.guidance_embeds else None
    packed = theirs(tokens, cond.hidden, timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                    **kwargs).sample
    unpacked = packed.transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)
    return Flux2KleinPipeline._unpatchify_latents(unpacked)


def ours_cond(model: MMDiT, cond: Conditioning) -> Conditioning:
    return cond if model.cfg.guidance_embed else Conditioning(cond.hidden, cond.mask, cond.pooled)


@pytest.mark.parametrize("guidance", [True, False])
def test_forward_with_padded_text_matches_diffusers(guidance):
    theirs = flux2_model(guidance=guidance)
    ours = from_diffusers(theirs)
    assert family_of(ours.cfg).name == "flux2" and ours.shared_mod is not None and ours.pooled_embed is None
    assert (ours.guidance_embed is not None) == guidance
    x, t, cond = inputs()
    with torch.no_grad():
        ref, out = reference(theirs, x, t, cond), ours(x, t, ours_cond(ours, cond))
        # the padded caption is the short one: with its mask, its padding never reaches the output
        short = Conditioning(cond.hidden[1:, :3], cond.mask[1:, :3], cond.pooled[1:],
                             {"guidance": cond.extra["guidance"][1:]})
        alone = ours(x[1:], t[1:], ours_cond(ours, short))
    assert out.shape == ref.shape == x.shape
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(out[1:], alone) < REL_TOL


def test_guidance_and_text_positions_reach_the_output():
    theirs = flux2_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs(padded=False)
    with torch.no_grad():
        out = ours(x, t, cond)
        other = Conditioning(cond.hidden, cond.mask, cond.pooled, {"guidance": cond.extra["guidance"] + 1})
        assert rel_err(ours(x, t, other), reference(theirs, x, t, other)) < REL_TOL
        assert rel_err(ours(x, t, other), out) > 100 * REL_TOL
        # FLUX.2 rotates text tokens by their place: reversing the caption's order changes the output
        flipped = Conditioning(cond.hidden.flip(1), cond.mask, cond.pooled, cond.extra)
        assert rel_err(ours(x, t, flipped), out) > 100 * REL_TOL


def test_gradients_of_every_weight_match_diffusers():
    theirs = flux2_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    target = torch.randn_like(x)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
    grads = to_theirs({k: p.grad for k, p in ours.named_parameters()}, flux2.diffusers_rules(ours.cfg))
    named = dict(theirs.named_parameters())
    assert set(grads) == set(named)
    worst = max(rel_err(grads[k], named[k].grad) for k in named)
    assert worst < REL_TOL, worst


@pytest.mark.parametrize("guidance", [True, False])
def test_weights_both_ways_are_bitwise(guidance):
    theirs = flux2_model(guidance=guidance)
    back = to_diffusers(from_diffusers(theirs))
    assert type(back) is Flux2Transformer2DModel
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.config.items() if not k.startswith("_")}
    sd, back_sd = theirs.state_dict(), back.state_dict()
    assert set(sd) == set(back_sd) and all(torch.equal(sd[k], back_sd[k]) for k in sd)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_keys_load_in_diffusers_and_round_trip_bitwise(prefix):
    theirs = flux2_model()
    ours = from_diffusers(theirs)
    original = {prefix + k: v for k, v in to_original(ours).items()}
    assert flux2.ORIGINAL_MARK in {k[len(prefix):] for k in original}
    # diffusers' own single-file converter reads our original keys into its layout, tensor for tensor
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k[len(prefix):]: v for k, v in original.items()})
    sd = theirs.state_dict()
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    again_model = from_original(original, time_freq_dim=32)
    assert family_of(again_model.cfg).name == "flux2" and again_model.cfg.rope_axes_dim == [4, 4, 4, 4]
    again = to_original(again_model)
    assert set(again) == {k[len(prefix):] for k in original}
    assert all(torch.equal(again[k], original[prefix + k]) for k in again)


def test_rope_table_matches_flux2_pos_embed():
    h, w, text_len, axes = 3, 5, 4, [4, 4, 8, 6]
    ours = flux2_rope_table(h, w, text_len, head_dim=24, axes_dim=axes, theta=2000.0, device="cpu")
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    cos, sin = Flux2PosEmbed(theta=2000, axes_dim=axes)(torch.cat([img_ids, txt_ids]))  # (S, 2 * pairs)
    pairs = sum(axes) // 2
    assert torch.equal(ours.cos[:, 0, :pairs], cos[:, ::2]) and torch.equal(ours.sin[:, 0, :pairs], sin[:, ::2])
    assert torch.all(ours.cos[:, 0, pairs:] == 1) and torch.all(ours.sin[:, 0, pairs:] == 0)  # unrotated tail


@pytest.mark.parametrize("preset, context_dim, low, high", [
    ("flux2-dev", 15360, 32.0e9, 32.5e9), ("flux2-klein-4b", 7680, 3.8e9, 3.95e9),
    ("flux2-klein-9b", 12288, 9.0e9, 9.2e9)])
def test_released_parameter_counts_equal_diffusers_on_meta(preset, context_dim, low, high):
    cfg = config_from_preset(preset)
    dcfg = flux2.diffusers_config(cfg)
    with torch.device("meta"):
        theirs = Flux2Transformer2DModel(**dcfg)
        ours = MMDiT(cfg)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs
    assert low < n_theirs < high, n_theirs
    assert dcfg["joint_attention_dim"] == context_dim and dcfg["in_channels"] == 128
    assert flux2.config_from_diffusers(dcfg) == cfg.__class__(**{**cfg.__dict__, "preset": "custom"})


def test_tiny_preset_starts_at_zero_and_exports():
    cfg = config_from_preset("tiny-flux2-klein-4b", in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM)
    ours = MMDiT(cfg)
    x, t, cond = inputs()
    assert torch.count_nonzero(ours(x, t, ours_cond(ours, cond))) == 0  # adaLN-Zero: zero final layer
    mods = ours.shared_mod(torch.randn(2, cfg.width))  # every block's modulation zero: each block the identity
    assert all(torch.count_nonzero(m) == 0 for m in (*mods.joint, *mods.single))
    assert not any(name.endswith(".bias") for name, _ in ours.named_parameters())
    theirs = to_diffusers(ours)
    assert type(theirs) is Flux2Transformer2DModel and not theirs.config.guidance_embeds
    assert convert_diffusers(flux2_model()).cfg.preset == "custom"


def test_flop_count_agrees_with_flop_counter_mode():
    """Bug caught: the shared modulation counted per image token (it runs once per sample)."""
    from flowmatch.families import FAMILIES
    from flowmatch.models.flops import counted_training_flops_per_step

    cfg = config_from_preset("tiny-flux2-klein-4b", in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM)
    estimate = FAMILIES["flux2"].flops(cfg, batch_size=2, latent_size=(16, 16), text_len=8)
    with torch.device("meta"):  # SDPA is counted there as on an accelerator
        model = MMDiT(cfg)
        cond = Conditioning(torch.zeros(1, 8, CONTEXT_DIM), torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 0))
        args = (torch.zeros(1, LATENT_CHANNELS, 16, 16), torch.full((1,), 0.5), cond)
    assert abs(estimate / counted_training_flops_per_step(model, args, batch_size=2) - 1) < 0.02


def test_a_recipe_whose_encoders_flux2_cannot_take_names_both():
    from flowmatch.config import recipe_from_dict
    from flowmatch.errors import RecipeError

    flux_text = {"combine": "flux", "encoders": {
        "clip_l": {"kind": "clip", "padding": "max_length", "max_length": 77, "pooling": "pooler"},
        "t5": {"kind": "t5", "padding": "max_length", "max_length": 512}}}
    with pytest.raises(RecipeError, match=r"model.family: flux2 takes no pooled text vector.*clip_l \(kind clip\)"):
        recipe_from_dict({"model": {"preset": "tiny-flux2-klein-4b"}, "text_encoders": flux_text})
    t5_alone = {"combine": "single", "encoders": {"t5": {"kind": "t5", "pooling": "none"}}}
    assert recipe_from_dict({"model": {"preset": "tiny-flux2-klein-4b"}, "text_encoders": t5_alone}
                            ).model.modulation == "shared"


def test_weights_of_one_family_are_refused_as_another():
    import dataclasses

    from flowmatch.errors import RecipeError
    from flowmatch.families.config import ModelConfig
    from flowmatch.families.presets import preset_values
    from flowmatch.init_from import with_architecture

    flux2_weights = convert_diffusers(flux2_model()).cfg
    flux_model = ModelConfig(**{**preset_values("tiny-flux-schnell"), "family": "flux", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: flux.*holds flux2 weights"):
        with_architecture(flux_model, flux2_weights)
    flux_weights = config_from_preset("tiny-flux-schnell", in_channels=4, context_dim=20, pooled_dim=12)
    flux2_cfg = ModelConfig(**{**preset_values("tiny-flux2-klein-4b"), "family": "flux2", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: flux2.*holds flux weights"):
        with_architecture(flux2_cfg, flux_weights)
    assert with_architecture(dataclasses.replace(flux2_cfg), flux2_weights).guidance_embed
