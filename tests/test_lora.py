"""LoRA through peft on the MMDiT: diffusers-named targets mapped onto our fused projections, the exported
`pytorch_lora_weights.safetensors` against diffusers' own `load_lora_adapter` on the same tiny random transformers,
merging, and the trainable-parameter counts of the released shapes (meta device)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flowmatch.engine.state import write_safetensors
from flowmatch.errors import RecipeError
from flowmatch.families.convert import from_diffusers
from flowmatch.families.lora import apply_lora, default_targets, select
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.lora import LORA_FILE, METADATA_KEY, merge, to_diffusers_lora
from flowmatch.models.lora import LoraConfig, adapter_key, is_adapter
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import (
    diffusers_model,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    ours_inputs,
    reference,
    rel_err,
    sample_inputs,
)

SIZES = dict(in_channels=4, context_dim=20, pooled_dim=12)
#: Our LoRA model and diffusers' with the exported file run the same adapters in another order of float sums.
REL_TOL = 1e-4


def chosen(preset: str, targets=None) -> set[str]:
    return {p.ours for p in select(config_from_preset(preset, **SIZES), targets)}


def test_default_targets_cover_the_fused_projections():
    depth = 2
    sd3 = chosen("tiny-sd3-medium")
    # Every joint block's image and text QKV and output projection, except the last block's text output, which
    # SD3's context-pre-only block does not have (its text K and V stay: add_k_proj and add_v_proj).
    want = {f"joint_blocks.{i}.{s}.{p}" for i in range(depth) for s in ("img", "txt") for p in ("qkv", "proj")}
    assert sd3 == want - {f"joint_blocks.{depth - 1}.txt.proj"}
    assert chosen("tiny-sd3.5-medium") == sd3 | {"joint_blocks.0.img.attn2.qkv", "joint_blocks.0.img.attn2.proj"}
    flux = chosen("tiny-flux-dev")
    assert {"single_blocks.0.linear_in", "single_blocks.1.linear_out", "joint_blocks.1.txt.mlp.fc2",
            "final.linear"} <= flux
    assert not any(".mod." in name or "embed" in name for name in flux)
    # A diffusers-style name of ours: only the image stream's output projections.
    assert chosen("tiny-sd3-medium", ["attn.to_out.0"]) == {"joint_blocks.0.img.proj", "joint_blocks.1.img.proj"}


def test_target_errors_name_the_key_and_the_fix():
    with pytest.raises(RecipeError, match=r"model.lora.targets.*fuses diffusers' .*to_q, .*to_k, .*to_v.*add to_k"):
        chosen("tiny-sd3-medium", ["to_q"])
    with pytest.raises(RecipeError, match=r"'to_qq' names no diffusers module.*did you mean 'to_q'"):
        chosen("tiny-sd3-medium", ["to_q", "to_k", "to_v", "to_qq"])
    with pytest.raises(RecipeError, match="proj_mlp"):  # FLUX single blocks fuse Q, K, V and the MLP input
        chosen("tiny-flux-dev", ["to_q", "to_k", "to_v"])
    with pytest.raises(RecipeError, match="convolution"):
        chosen("tiny-sd3-medium", ["pos_embed.proj"])


def randomise_adapters(model: MMDiT, seed: int = 3) -> None:
    """B starts at zero (the adapted model equals the base): give every factor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["sd3-medium", "sd3.5-medium", "flux-dev"])
def test_exported_adapters_load_in_diffusers_with_the_same_outputs(kind, tmp_path):
    """Bugs caught: B split in the wrong order or A not shared across a fused projection's modules, module names
    off by a block or a stream, the scale lost when alpha != rank (metadata), merging with the wrong scale."""
    ours = from_diffusers(diffusers_model(kind))
    lora = LoraConfig(rank=3, alpha=7.0)
    torch.manual_seed(0)
    projections = apply_lora(ours, lora)
    assert all(p.requires_grad == is_adapter(n) for n, p in ours.named_parameters())
    randomise_adapters(ours)
    adapters = {k: v for k, v in ours.state_dict().items() if is_adapter(k)}
    tensors, metadata = to_diffusers_lora(adapters, projections, lora)
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in tensors)
    header = json.loads(metadata[METADATA_KEY])
    assert (header["transformer.r"], header["transformer.lora_alpha"]) == (3, 7.0)
    write_safetensors(tmp_path / LORA_FILE, tensors, metadata)
    with safe_open(str(tmp_path / LORA_FILE), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == header

    theirs = diffusers_model(kind)
    theirs.load_lora_adapter(str(tmp_path), weight_name=LORA_FILE, prefix="transformer")
    x, t, cond = sample_inputs(8, 8)
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        out = ours(x, t, ours_inputs(ours, cond))
        base = reference(diffusers_model(kind), x, t, cond)
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(base, ref) > 100 * REL_TOL  # the adapters do change the output

    base_state = from_diffusers(diffusers_model(kind)).state_dict()
    merged = MMDiT(ours.cfg)
    merged.load_state_dict(merge(base_state, adapters, projections, lora))
    with torch.no_grad():
        assert rel_err(merged(x, t, ours_inputs(ours, cond)), out) < REL_TOL


def adapter_count(preset: str, lora: LoraConfig, **sizes) -> int:
    with torch.device("meta"):
        model = MMDiT(config_from_preset(preset, **sizes), device="meta")
        apply_lora(model, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameters_of_the_released_shapes_on_the_meta_device():
    """The count peft creates equals r (in + out) summed over the adapted projections, per shape."""
    r = 16
    lora = LoraConfig(rank=r, alpha=r)
    # SD3-medium: 24 joint blocks of width 1536; every block adapts image QKV (in D, out 3D) and output (D, D),
    # text QKV and output likewise, except the last block's text stream: K and V only (out 2D), no output.
    d, depth = 1536, 24
    per_block = r * ((d + 3 * d) + (d + d)) * 2
    want = depth * per_block - r * d - r * 2 * d
    assert adapter_count("sd3-medium", lora, in_channels=16, context_dim=4096, pooled_dim=2048) == want
    flux = adapter_count("flux-dev", lora, in_channels=16, context_dim=4096, pooled_dim=768)
    d, hidden = 3072, 12288
    joint = 2 * r * ((d + 3 * d) + 2 * d + (d + hidden) + (hidden + d))
    single = r * ((d + 3 * d + hidden) + (d + hidden + d))
    final = r * (d + 2 * 2 * 16)
    assert flux == 19 * joint + 38 * single + final
    assert default_targets(config_from_preset("sd3-medium"))[:3] == ["attn.to_q", "attn.to_k", "attn.to_v"]


def test_adapter_keys_name_our_modules():
    assert adapter_key("joint_blocks.0.img.qkv", "A") == "joint_blocks.0.img.qkv.lora_A.default.weight"
    assert is_adapter("joint_blocks.0.img.qkv.lora_B.default.weight")
    assert not is_adapter("joint_blocks.0.img.qkv.weight")
