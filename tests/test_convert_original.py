"""Original single-file keys in and out: SD3/SD3.5 `joint_blocks.*` and BFL FLUX `double_blocks.*` /
`single_blocks.*`, with or without the `model.diffusion_model.` prefix, as safetensors files ComfyUI and the
releases use. Checked against diffusers' own single-file converters, which map those keys to diffusers'
layout, and by bitwise round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from flowmatch.families.convert import architecture_of, from_diffusers, from_original, save_original, to_original
from flowmatch.models.convert.keymap import Inert, Tail
from tests.interop_models import (
    KINDS,
    diffusers_converter,
    diffusers_model,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    ours_inputs,
    reference,
    rel_err,
    sample_inputs,
)

REL_TOL = 1e-4
SD3_KINDS = [k for k in KINDS if k.startswith("sd3")]


def inert_parts(model, fmt: str) -> dict[str, int]:
    """Their keys holding tensors that reach no output -> how many leading rows do (all of them: -1)."""
    arch = architecture_of(model.cfg)
    rules = arch.diffusers_rules(model.cfg) if fmt == "diffusers" else arch.original_rules(model.cfg)
    return {rule.theirs[0]: rule.op.head if isinstance(rule.op, Tail) else -1
            for rule in rules if isinstance(rule.op, (Inert, Tail))}


@pytest.mark.parametrize("kind", KINDS)
def test_original_keys_are_the_ones_diffusers_single_file_loader_reads(kind):
    theirs = diffusers_model(kind)
    ours = from_diffusers(theirs)
    original = to_original(ours)
    converted = diffusers_converter(ours)({k: v.clone() for k, v in original.items()})
    expected = theirs.state_dict()
    assert converted.keys() == expected.keys()
    skip = inert_parts(ours, "diffusers")  # text queries of SD3's last block: neutral values in our export
    for name, value in converted.items():
        if name == "pos_embed.pos_embed":  # the table we compute, equal to diffusers' to float32 rounding
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
        elif name not in skip:
            assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix", [None, "", "model.diffusion_model.", "diffusion_model."])
def test_original_round_trips_are_bitwise(kind, prefix):
    ours = from_diffusers(diffusers_model(kind))
    original = to_original(ours, prefix=prefix)
    if prefix is None:  # the releases' own: SD3's single files carry the prefix, BFL's do not
        assert next(iter(original)).startswith("model.diffusion_model.") == (not ours.cfg.rope)
    # Inert tensors (SD3's last-block text queries, its position table) with arbitrary values survive too.
    torch.manual_seed(3)
    for key, rows in inert_parts(ours, "original").items():
        name = (prefix if prefix is not None else "model.diffusion_model.") + key
        if key == "pos_embed":  # checked against the computed table: a rounding-sized change
            original[name] = original[name] + 1e-7
        else:
            original[name] = original[name].clone()
            original[name][:rows if rows > 0 else None] = torch.randn_like(original[name][:rows if rows > 0 else None])
    # A single file also holds the text encoders and the VAE under their own prefixes.
    extra = {"first_stage_model.decoder.conv_in.weight": torch.ones(2), "text_encoders.clip_l.w": torch.ones(3)}
    # What the keys do not show: the tiny models' head width (no QK-norm), position grid and RoPE split.
    hints = dict(rope_axes_dim=[4, 6, 6]) if ours.cfg.rope else dict(sample_size=8, head_dim=8)
    back = from_original({**original, **(extra if prefix else {})}, **hints)
    assert back.cfg == ours.cfg
    for name, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name
    again = to_original(back, prefix=prefix)
    assert again.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(value, again[name]), name


@pytest.mark.parametrize("kind", ["sd3.5-medium", "flux-dev"])
def test_saved_original_file_loads_with_its_config(tmp_path, kind):
    theirs = diffusers_model(kind)
    ours = from_diffusers(theirs)
    path = save_original(ours, tmp_path / "model.safetensors")
    loaded = from_original(path)
    assert loaded.cfg == ours.cfg
    x, t, cond = sample_inputs(6, 10)
    with torch.no_grad():
        assert rel_err(loaded(x, t, ours_inputs(loaded, cond)), reference(theirs, x, t, cond)) < REL_TOL


def test_config_is_inferred_from_keys_and_what_they_do_not_show_is_asked_for(tmp_path):
    sd35 = from_diffusers(diffusers_model("sd3.5-medium"))
    bare = tmp_path / "bare.safetensors"  # no config in its metadata, as the releases' files
    save_file(to_original(sd35), str(bare))
    with pytest.raises(ValueError, match="sample_size=128"):
        from_original(bare)  # SD3's 128 assumed; the stored position table says otherwise
    inferred = from_original(bare, sample_size=8)
    assert inferred.cfg == sd35.cfg and inferred.cfg.dual_attention_layers == [0, 1]

    dev = from_diffusers(diffusers_model("flux-dev"))
    save_file(to_original(dev), str(bare))
    with pytest.raises(ValueError, match="rope_axes_dim"):
        from_original(bare)  # FLUX.1's split is known for 128-channel heads only
    inferred = from_original(bare, rope_axes_dim=[4, 6, 6])
    assert inferred.cfg == dev.cfg and inferred.cfg.guidance_embed

    with pytest.raises(ValueError, match="not an original SD3"):
        from_original({"foo.weight": torch.ones(1)})
    broken = to_original(dev)
    broken["double_blocks.0.img_attn.extra.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="no counterpart.*img_attn.extra"):
        from_original(broken, rope_axes_dim=[4, 6, 6])


@pytest.mark.slow  # a fresh interpreter
def test_original_conversion_does_not_import_diffusers(tmp_path):
    path = save_original(from_diffusers(diffusers_model("flux-schnell")), tmp_path / "m.safetensors")
    code = ("import sys; from flowmatch.families.convert import from_original, to_original; "
            f"m = from_original({str(path)!r}); to_original(m); assert 'diffusers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
