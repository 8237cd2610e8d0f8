"""Equivalence with diffusers' SD3Transformer2DModel and FluxTransformer2DModel on tiny random configs of every
released architecture (nothing is downloaded), and loading from folders and hub ids.

diffusers is a hard dependency: if it fails to import, these tests fail (they are never skipped).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from flowmatch.conditioning import Conditioning
from flowmatch.families.convert import architecture_of, convert_diffusers, from_diffusers, to_diffusers, to_original
from flowmatch.families.flux import convert as flux
from flowmatch.families.kontext import convert as kontext
from flowmatch.families.presets import config_from_preset
from flowmatch.families.sd3 import convert as sd3
from flowmatch.models.convert.keymap import Inert, to_theirs
from flowmatch.models.embeddings import rope_table, sincos_pos_embed_2d
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import (
    KINDS,
    diffusers_model,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    ours_inputs,
    reference,
    rel_err,
    sample_inputs,
)

REL_TOL = 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(8, 8), (6, 14), (20, 4)])
def test_from_diffusers_matches_outputs(kind, size):
    theirs = diffusers_model(kind)
    ours = from_diffusers(theirs)
    x, t, cond = sample_inputs(*size)
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        out = ours(x, t, ours_inputs(ours, cond))
    assert out.shape == ref.shape == (2, ours.out_channels, *size)
    assert rel_err(out, ref) < REL_TOL


def test_converted_configs_are_the_architectures():
    sd3_medium = from_diffusers(diffusers_model("sd3-medium"))
    sd35_medium = from_diffusers(diffusers_model("sd3.5-medium"))
    assert not sd3_medium.cfg.qk_norm and sd3_medium.joint_blocks[-1].context_pre_only
    assert sd35_medium.cfg.dual_attention_layers == [0, 1] and sd35_medium.joint_blocks[1].img.attn2 is not None
    assert sd35_medium.joint_blocks[2].img.attn2 is None
    dev = from_diffusers(diffusers_model("flux-dev"))
    assert (dev.cfg.rope, dev.cfg.axes_dim, dev.cfg.in_channels, dev.cfg.patch_size) == (True, [4, 6, 6], 4, 2)
    assert dev.cfg.guidance_embed and dev.guidance_embed is not None
    assert not from_diffusers(diffusers_model("flux-schnell")).cfg.guidance_embed
    # The same conversion before a model is built: config and our state dict, for sizing or sharding first.
    converted = convert_diffusers(diffusers_model("flux-dev"))
    assert converted.cfg == dev.cfg and converted.fmt == "diffusers" and not converted.inert
    assert {k: v.shape for k, v in converted.state_dict.items()} == {k: v.shape for k, v in dev.state_dict().items()}


def test_flux_dev_guidance_reaches_the_output():
    theirs = diffusers_model("flux-dev")
    ours = from_diffusers(theirs)
    x, t, cond = sample_inputs()
    other = Conditioning(cond.hidden, cond.mask, cond.pooled, {"guidance": cond.extra["guidance"] + 1})
    with torch.no_grad():
        assert rel_err(ours(x, t, other), reference(theirs, x, t, other)) < REL_TOL
        assert rel_err(ours(x, t, other), ours(x, t, cond)) > 100 * REL_TOL
    with pytest.raises(ValueError, match=r"cond.extra\['guidance'\]"):
        ours(x, t, Conditioning(cond.hidden, cond.mask, cond.pooled))


@pytest.mark.parametrize("kind", KINDS)
def test_padded_text_matches_diffusers_on_the_unpadded_text(kind):
    # Conditioning pads a batch to its longest caption; masked padding must change nothing, so the padded input
    # gives diffusers' output on the real tokens alone.
    theirs = diffusers_model(kind)
    ours = from_diffusers(theirs)
    x, t, cond = sample_inputs(8, 6, text_len=5)
    padded = cond.pad_to(9)
    padded.hidden[:, 5:] = 7.0  # nonzero padding: only the mask can hide it
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        assert rel_err(ours(x, t, ours_inputs(ours, padded)), ref) < REL_TOL
        # The same tokens visible do change the output, so the check above can fail.
        visible = Conditioning(padded.hidden, torch.ones_like(padded.mask), padded.pooled, padded.extra)
        assert rel_err(ours(x, t, ours_inputs(ours, visible)), ref) > 100 * REL_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_of_every_weight_match_diffusers(kind):
    theirs = diffusers_model(kind).train()
    ours = from_diffusers(theirs)
    x, t, cond = sample_inputs(6, 10)
    target = torch.randn(2, ours.out_channels, 6, 10)
    (reference(theirs, x, t, cond) - target).square().mean().backward()
    (ours(x, t, ours_inputs(ours, cond)) - target).square().mean().backward()
    # Our gradients mapped to their layout by the same key map as the weights.
    rules = architecture_of(ours.cfg).diffusers_rules(ours.cfg)
    inert = {k for rule in rules if isinstance(rule.op, Inert) for k in rule.theirs}
    mapped = to_theirs({k: p.grad for k, p in ours.named_parameters()}, rules)
    for name, param in theirs.named_parameters():
        if name in inert:  # the last SD3 block's text queries feed no output
            assert param.grad is None or param.grad.abs().max() == 0, name
        else:
            assert rel_err(mapped[name], param.grad) < REL_TOL, name


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_round_trip_is_bitwise(kind):
    theirs = diffusers_model(kind)  # the inert last-block text queries are random too
    back = to_diffusers(from_diffusers(theirs))
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (theirs, back)]
    assert type(back) is type(theirs) and public[0] == public[1]
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("preset", ["tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large", "tiny-flux-dev",
                                    "tiny-flux-schnell", "tiny"])
def test_to_diffusers_from_a_preset_matches_outputs_and_round_trips(preset):
    torch.manual_seed(0)
    cfg = config_from_preset(preset, in_channels=4, context_dim=20, pooled_dim=12)
    ours = MMDiT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    theirs = to_diffusers(ours)
    assert type(theirs) is (FluxTransformer2DModel if cfg.rope else SD3Transformer2DModel)
    x, t, cond = sample_inputs(10, 6)
    with torch.no_grad():
        assert rel_err(ours(x, t, ours_inputs(ours, cond)), reference(theirs, x, t, cond)) < REL_TOL
    back = from_diffusers(theirs)
    assert back.cfg == dataclasses.replace(cfg, preset="custom")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    # The diffusers model holds a copy: changing ours leaves it as it was.
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in theirs.state_dict().items())


def _check_loads(path, theirs):
    x, t, cond = sample_inputs(8, 12)
    model = from_diffusers(path)
    with torch.no_grad():
        assert rel_err(model(x, t, ours_inputs(model, cond)), reference(theirs, x, t, cond)) < REL_TOL


@pytest.mark.parametrize("kind", ["sd3.5-medium", "flux-dev"])
def test_from_saved_transformer_and_pipeline_folders(tmp_path, kind):
    theirs = diffusers_model(kind)
    theirs.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for path in (tmp_path / "transformer", tmp_path, str(tmp_path)):
        _check_loads(path, theirs)
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        from_diffusers(tmp_path.parent)


def _fake_hub_repo(cache, repo_id: str, subfolder: str, model) -> None:
    """A repository as huggingface_hub's cache holds it after a download: snapshots/<commit>/ and refs/main."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_from_hub_ids_through_the_real_loading_code_offline(tmp_path, monkeypatch):
    # The tests run with HF_HUB_OFFLINE=1 (conftest): hub ids resolve from the cache, as after a download.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    sd35, dev = diffusers_model("sd3.5-medium"), diffusers_model("flux-dev")
    _fake_hub_repo(tmp_path, "tiny-org/sd35-pipeline", "transformer", sd35)
    _fake_hub_repo(tmp_path, "tiny-org/flux-transformer", "", dev)
    _check_loads("tiny-org/sd35-pipeline", sd35)
    _check_loads("tiny-org/flux-transformer", dev)


def test_converted_configs_carry_their_preset_name():
    # The released configs, as their transformer/config.json files state them.
    released = {
        "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                           num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                             dual_attention_layers=list(range(13))),
        "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
    }
    released["flux-schnell"] = {**released["flux-dev"], "guidance_embeds": False}
    # black-forest-labs/FLUX.1-Kontext-dev's transformer config is FLUX.1-dev's; its pipeline class says Kontext.
    released["flux-kontext-dev"] = dict(released["flux-dev"])
    for name, dcfg in released.items():
        arch = kontext if name.startswith("flux-kontext") else flux if name.startswith("flux") else sd3
        cfg = arch.config_from_diffusers(dcfg)
        assert cfg == config_from_preset(name, preset="custom"), name
        built = MMDiT(cfg, device="meta")
        # Parameter counts equal diffusers' own model of that config, less the inert last-block text queries.
        with torch.device("meta"):
            theirs = (SD3Transformer2DModel if arch is sd3 else FluxTransformer2DModel)(**dcfg)
        inert = 0 if arch in (flux, kontext) else cfg.width * cfg.width + cfg.width + (cfg.head_dim if cfg.qk_norm else 0)
        assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in theirs.parameters()) - inert
    theirs = diffusers_model("flux-dev")
    assert from_diffusers(theirs).cfg.preset == "custom"


def test_position_embedding_matches_diffusers_crops():
    theirs = diffusers_model("sd3-medium", num_layers=1)
    for height, width in [(8, 8), (6, 14), (24, 2)]:
        ref = theirs.pos_embed.cropped_pos_embed(height, width)[0]
        ours = sincos_pos_embed_2d(height // 2, width // 2, 32, base_size=4, max_size=12, device=torch.device("cpu"))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_rope_table_matches_flux_pos_embed():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    grid_h, grid_w, text_len = 3, 5, 4
    table = rope_table(grid_h, grid_w, text_len, head_dim=16, axes_dim=[4, 6, 6], theta=10000.0,
                       device=torch.device("cpu"))
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid_h, grid_w, "cpu", torch.float32)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(torch.cat([img_ids, torch.zeros(text_len, 3)]))
    # diffusers repeats each angle for the two channels of a rotated pair.
    torch.testing.assert_close(table.cos[:, 0].repeat_interleave(2, dim=-1), cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(table.sin[:, 0].repeat_interleave(2, dim=-1), sin, rtol=0, atol=1e-7)


def test_unsupported_variants_raise():
    with pytest.raises(ValueError, match="qk_norm='layer_norm'"):
        from_diffusers(diffusers_model("sd3.5-large", qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="single-stream"):
        from_diffusers(diffusers_model("flux-dev", num_single_layers=0))
    cfg = config_from_preset("tiny", in_channels=4, context_dim=20, pooled_dim=12, rope=True)
    with pytest.raises(ValueError, match="rope_axes_dim"):
        to_diffusers(MMDiT(cfg))
    cfg = config_from_preset("tiny", in_channels=4, context_dim=20, pooled_dim=12, single_blocks=1)
    with pytest.raises(ValueError, match="'single_blocks': 1"):
        to_diffusers(MMDiT(cfg))
    with pytest.raises(ValueError, match="not supported; flowmatch converts"):
        from_diffusers(torch.nn.Linear(2, 2))
    # a few-step model's step embedder has no place in the released formats: refused, not silently dropped
    few_step = MMDiT(config_from_preset("tiny", in_channels=4, context_dim=20, pooled_dim=12, interval_embed=True))
    for export in (to_diffusers, to_original):
        with pytest.raises(ValueError, match="model.interval_embed.*flowmatch's Pipeline"):
            export(few_step)
