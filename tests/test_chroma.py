"""The Chroma family against diffusers' ChromaTransformer2DModel on tiny random configs (nothing downloaded):
forward and every weight's gradient with padded text, weights both ways bitwise, the release's original
single-file keys both ways, and the parameter count at the released shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ChromaTransformer2DModel, FluxPipeline
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowmatch.conditioning import Conditioning
from flowmatch.config import recipe_from_dict
from flowmatch.errors import RecipeError
from flowmatch.families import family_of
from flowmatch.families.chroma import convert as chroma
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import convert_diffusers, from_diffusers, from_original, to_diffusers, to_original
from flowmatch.families.presets import config_from_preset, preset_values
from flowmatch.init_from import with_architecture
from flowmatch.models.convert.keymap import to_theirs
from flowmatch.models.flops import training_flops_per_step
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import (
    FLUX_VAE_FACTOR,
    LATENT_CHANNELS,
    diffusers_converter,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    rel_err,
)

CONTEXT_DIM = 20
REL_TOL = 1e-5


def chroma_model(seed: int = 0, **overrides) -> ChromaTransformer2DModel:
    """A tiny random ChromaTransformer2DModel, every weight perturbed (so all of them reach the output)."""
    torch.manual_seed(seed)
    kwargs = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=CONTEXT_DIM,
                  axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=24,
                  approximator_layers=2)
    model = ChromaTransformer2DModel(**{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(height=8, width=6, batch=2, text_len=7, seed=1) -> tuple[Tensor, Tensor, Conditioning]:
    """(x, t, cond) with the second caption padded after 3 tokens (padding hidden states random: never read)."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g), torch.rand(batch, generator=g)
    hidden = torch.randn(batch, text_len, CONTEXT_DIM, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, Conditioning(hidden, mask, torch.zeros(batch, 0))


def reference(theirs: ChromaTransformer2DModel, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """diffusers' velocity for our inputs: packed latents, (0, row, column) ids, t itself (it multiplies by 1000),
    and the text mask as a bool [text, image] mask, as ChromaPipeline lays it out."""
    b, c, h, w = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    tokens = FluxPipeline._pack_latents(x, b, c, h, w)
    mask = torch.cat([cond.mask, torch.ones(b, tokens.shape[1], dtype=torch.bool)], dim=1)
    packed = theirs(tokens, cond.hidden, t, img_ids, torch.zeros(cond.length, 3), attention_mask=mask).sample
    return FluxPipeline._unpack_latents(packed, h * FLUX_VAE_FACTOR, w * FLUX_VAE_FACTOR, FLUX_VAE_FACTOR)


def test_forward_with_padded_text_matches_diffusers():
    theirs = chroma_model()
    ours = from_diffusers(theirs)
    assert family_of(ours.cfg).name == "chroma" and ours.pooled_embed is None and ours.time_embed is None
    x, t, cond = inputs()
    with torch.no_grad():
        ref, out = reference(theirs, x, t, cond), ours(x, t, cond)
        # the padded caption is the short one: its padding never reaches the output
        short = Conditioning(cond.hidden[1:, :3], cond.mask[1:, :3], cond.pooled[1:])
        alone = ours(x[1:], t[1:], short)
    assert out.shape == ref.shape == x.shape
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(out[1:], alone) < REL_TOL


def test_gradients_of_every_weight_match_diffusers():
    theirs = chroma_model()
    ours = from_diffusers(theirs)
    x, t, cond = inputs()
    target = torch.randn_like(x)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, cond) - target).square().mean().backward()
    grads = to_diffusers_grads(ours)
    named = dict(theirs.named_parameters())
    assert set(grads) == set(named)
    worst = max(rel_err(grads[k], named[k].grad) for k in named)
    assert worst < REL_TOL, worst


def to_diffusers_grads(ours: MMDiT) -> dict[str, Tensor]:
    """Our gradients under diffusers' names, through the same key table as the weights."""
    return to_theirs({k: p.grad for k, p in ours.named_parameters()}, chroma.diffusers_rules(ours.cfg))


def test_weights_both_ways_are_bitwise():
    theirs = chroma_model()
    back = to_diffusers(from_diffusers(theirs))
    assert type(back) is ChromaTransformer2DModel
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.config.items() if not k.startswith("_")}
    sd, back_sd = theirs.state_dict(), back.state_dict()
    assert set(sd) == set(back_sd) and all(torch.equal(sd[k], back_sd[k]) for k in sd)
    # the buffer outside the state dict is rebuilt equal to diffusers' own
    assert torch.equal(back.time_text_embed.mod_proj, theirs.time_text_embed.mod_proj)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_keys_load_in_diffusers_and_round_trip_bitwise(prefix):
    theirs = chroma_model()
    ours = from_diffusers(theirs)
    original = {prefix + k: v for k, v in to_original(ours).items()}
    assert "distilled_guidance_layer.norms.0.scale" in {k[len(prefix):] for k in original}
    # diffusers' own single-file converter reads our original keys into its layout, tensor for tensor
    converted = diffusers_converter(ours)(dict(original))
    sd = theirs.state_dict()
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    ours = from_original(original, rope_axes_dim=[4, 6, 6])
    assert family_of(ours.cfg).name == "chroma"
    again = to_original(ours)
    assert set(again) == {k[len(prefix):] for k in original}
    assert all(torch.equal(again[k], original[prefix + k]) for k in again)


def test_released_parameter_count_equals_diffusers_on_meta():
    with torch.device("meta"):
        theirs = ChromaTransformer2DModel()  # its defaults are Chroma1-HD's shape
        ours = MMDiT(config_from_preset("chroma", in_channels=16, context_dim=4096))
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs
    assert 8.7e9 < n_theirs < 9.0e9
    assert convert_diffusers(chroma_model()).cfg.preset == "custom"


def test_tiny_preset_exports_and_starts_at_zero():
    cfg = config_from_preset("tiny-chroma", in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM)
    ours = MMDiT(cfg)
    x, t, cond = inputs()
    assert torch.count_nonzero(ours(x, t, cond)) == 0  # adaLN-Zero: zero final layer
    mods = ours.approximator(t * 1000)  # and every block's modulation zero: each block starts as the identity
    assert all(torch.count_nonzero(m) == 0 for m in (*mods.joint, *mods.single, mods.final))
    assert len(mods.joint) == 2 and mods.joint[0].shape == (2, 12, cfg.width) and mods.single[0].shape[1] == 3
    theirs = to_diffusers(ours)
    assert type(theirs) is ChromaTransformer2DModel
    assert theirs.config.approximator_hidden_dim == cfg.approximator_hidden


def _recipe(pooling: str = "mean", **model) -> dict:
    return {"model": model, "text_encoders": {"combine": "single", "encoders": {"t5": {"kind": "t5",
                                                                                        "pooling": pooling}}}}


def test_a_recipe_whose_encoders_the_family_cannot_take_names_both():
    # a pooled-vector family without an encoder that pools
    with pytest.raises(RecipeError, match=r"model.family: flux reads a pooled text vector.*t5 \(t5\).*pooling: none"):
        recipe_from_dict(_recipe(pooling="none", preset="flux-schnell", init_from="weights/"))
    assert recipe_from_dict(_recipe(preset="flux-schnell", init_from="weights/")).model.rope  # any pooling encoder
    # Chroma takes no pooled vector: a CLIP encoder beside its T5 is refused
    flux_text = {"combine": "flux", "encoders": {
        "clip_l": {"kind": "clip", "padding": "max_length", "max_length": 77, "pooling": "pooler"},
        "t5": {"kind": "t5", "padding": "max_length", "max_length": 512}}}
    with pytest.raises(RecipeError, match=r"model.family: chroma takes no pooled text vector.*clip_l \(kind clip\)"):
        recipe_from_dict({"model": {"preset": "tiny-chroma"}, "text_encoders": flux_text})
    assert recipe_from_dict(_recipe(pooling="none", preset="tiny-chroma", init_from="weights/")
                            ).model.modulation == "approximator"
    # trained from scratch or from a flowmatch run (no released pooled width), a pooled-vector family may pool its
    # one encoder (the digits recipes)
    assert recipe_from_dict(_recipe(preset="flux-schnell")).model.family is None
    assert recipe_from_dict(_recipe(preset="tiny-flux-schnell", init_from="runs/x")).model.family is None


def test_weights_of_one_family_are_refused_as_another():
    chroma_weights = convert_diffusers(chroma_model()).cfg
    flux_model = ModelConfig(**{**preset_values("tiny-flux-schnell"), "family": "flux", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: flux.*holds chroma weights.*chroma checkpoint does not "
                                          r"load as a flux model"):
        with_architecture(flux_model, chroma_weights)
    flux_weights = config_from_preset("tiny-flux-schnell", in_channels=4, context_dim=20, pooled_dim=12)
    chroma_cfg = ModelConfig(**{**preset_values("tiny-chroma"), "family": "chroma", "init_from": "w/"})
    with pytest.raises(RecipeError, match=r"model.family: chroma.*holds flux weights"):
        with_architecture(chroma_cfg, flux_weights)
    assert with_architecture(dataclasses.replace(chroma_cfg), chroma_weights).approximator_hidden == 24


def test_flop_estimate_counts_the_approximator_once_per_modulation_row():
    cfg = config_from_preset("tiny-chroma", in_channels=LATENT_CHANNELS, context_dim=CONTEXT_DIM,
                             approximator_hidden=64)
    model = from_diffusers(to_diffusers(MMDiT(cfg)))  # nonzero weights throughout
    x, t, cond = inputs(height=8, width=12, batch=3)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, cond).sum().backward()
    estimate = training_flops_per_step(model, batch_size=3, latent_size=(8, 12), text_len=7)
    # the estimate also counts biases, norm weights and the first layers' input gradients: a small excess
    assert 0.9 < counter.get_total_flops() / estimate.total < 1.0
