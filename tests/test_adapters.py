"""LoRA's siblings through peft (``model.lora.kind``: dora, loha, lokr) on the MMDiT: injected on the same
diffusers-named targets, written per diffusers module as peft names them and loaded onto diffusers' own tiny
transformers with the same outputs, merged by peft, and refused with a pointer to ``--merge`` where a format
cannot express them."""

from __future__ import annotations

import copy

import pytest
import torch

from flowmatch.engine.state import write_safetensors
from flowmatch.errors import RecipeError
from flowmatch.families.convert import from_diffusers
from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.adapters import ExportError, load_into, merge_adapters, to_diffusers_adapters
from flowmatch.models.convert.lora import LORA_FILE
from flowmatch.models.lora import LoraConfig, is_adapter
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import (
    diffusers_model,
    one_thread,  # noqa: F401 - applies the module-wide fixture
    ours_inputs,
    reference,
    rel_err,
    sample_inputs,
)
from tests.test_lora import REL_TOL, randomise_adapters

KINDS = ["dora", "loha", "lokr"]


def adapted(family: str, lora: LoraConfig):
    ours = from_diffusers(diffusers_model(family))
    torch.manual_seed(0)
    chosen = apply_lora(ours, lora)
    return ours, chosen


def test_adapters_start_as_the_identity_and_train_only_themselves():
    base = from_diffusers(diffusers_model("sd3-medium"))
    x, t, cond = sample_inputs(8, 8)
    with torch.no_grad():
        before = base(x, t, ours_inputs(base, cond))
    for kind in KINDS:
        ours = copy.deepcopy(base)
        torch.manual_seed(0)
        apply_lora(ours, LoraConfig(rank=2, alpha=4.0, kind=kind))
        trained = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert trained and all(is_adapter(n) for n in trained), kind
        assert all(is_adapter(n) == p.requires_grad for n, p in ours.named_parameters()), kind
        with torch.no_grad():
            assert torch.equal(ours(x, t, ours_inputs(ours, cond)), before), kind


def test_kinds_and_factors_are_checked_with_the_fix():
    with pytest.raises(ValueError, match=r"model.lora.kind: 'lokrr'.*did you mean 'lokr'"):
        LoraConfig(kind="lokrr")
    with pytest.raises(ValueError, match="factor"):
        LoraConfig(kind="lokr", factor=0)


def test_a_lokr_on_a_fused_projection_is_refused_with_merge_as_the_way_out():
    lora = LoraConfig(rank=2, alpha=3.0, kind="lokr")  # default targets: SD3's fused Q, K, V
    ours, chosen = adapted("sd3-medium", lora)
    adapters = {k: v for k, v in ours.state_dict().items() if is_adapter(k)}
    with pytest.raises(ExportError, match=r"joint_blocks.0.img.qkv.*attn.to_q, .*--merge"):
        to_diffusers_adapters(adapters, chosen, lora)


def test_dora_on_an_all_zero_row_is_refused():
    """DoRA divides by each output row's norm: a zero-initialised layer (an untrained final layer) gives NaN."""
    model = MMDiT(from_diffusers(diffusers_model("sd3-medium")).cfg)  # init_weights zeroes the final layer
    with pytest.raises(RecipeError, match=r"dora.*final.linear.*model.lora.targets"):
        apply_lora(model, LoraConfig(rank=2, kind="dora", targets=["proj_out"]))


@pytest.mark.parametrize("family,kind,targets", [
    ("sd3-medium", "dora", None), ("flux-dev", "loha", None),
    ("flux-dev", "lokr", ["attn.to_out.0", "ff.net.2"])])
def test_exported_adapters_load_onto_diffusers_with_the_same_outputs(family, kind, targets, tmp_path):
    """Bugs caught: a row-side factor (B, the magnitude, hada_w*_a, lokr_w1) not split or split in the wrong
    order, a column-side factor permuted like a row one, factors written under the wrong peft names, the kind
    lost from the header, merging without DoRA's rescaling. DoRA goes through diffusers' own load_lora_adapter,
    the others through peft (load_into)."""
    lora = LoraConfig(rank=2, alpha=3.0, kind=kind, targets=targets)
    ours, chosen = adapted(family, lora)
    randomise_adapters(ours)
    adapters = {k: v for k, v in ours.state_dict().items() if is_adapter(k)}
    tensors, metadata = to_diffusers_adapters(adapters, chosen, lora)
    theirs = diffusers_model(family)
    if kind == "dora":  # diffusers' own loader reads DoRA's magnitudes
        write_safetensors(tmp_path / LORA_FILE, tensors, metadata)
        theirs.load_lora_adapter(str(tmp_path), weight_name=LORA_FILE, prefix="transformer")
    else:
        load_into(theirs, tensors, metadata)
    x, t, cond = sample_inputs(8, 8)
    with torch.no_grad():
        ref = reference(theirs, x, t, cond)
        out = ours(x, t, ours_inputs(ours, cond))
        base = reference(diffusers_model(family), x, t, cond)
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(base, ref) > 100 * REL_TOL  # the adapters do change the output
    merged = MMDiT(ours.cfg)
    merged.load_state_dict(merge_adapters(from_diffusers(diffusers_model(family)).state_dict(), adapters, chosen,
                                          lora))
    with torch.no_grad():
        assert rel_err(merged(x, t, ours_inputs(ours, cond)), out) < REL_TOL


def lycoris_delta(fs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight update of one module's LyCORIS factors as ComfyUI's loader computes it: alpha / dim times
    kron(w1, w2) (LoKr, dim the rank of a decomposed factor, else scale 1) or (w1a w1b) * (w2a w2b) (LoHa)."""
    alpha = fs["alpha"].item()
    if "hada_w1_a" in fs:
        rank = fs["hada_w1_b"].shape[0]
        return (fs["hada_w1_a"] @ fs["hada_w1_b"]) * (fs["hada_w2_a"] @ fs["hada_w2_b"]) * alpha / rank
    w1 = fs["lokr_w1"] if "lokr_w1" in fs else fs["lokr_w1_a"] @ fs["lokr_w1_b"]
    w2 = fs["lokr_w2"] if "lokr_w2" in fs else fs["lokr_w2_a"] @ fs["lokr_w2_b"]
    dim = fs["lokr_w1_b"].shape[0] if "lokr_w1_b" in fs else fs["lokr_w2_b"].shape[0] if "lokr_w2_b" in fs else None
    return torch.kron(w1, w2) * (alpha / dim if dim else 1.0)


@pytest.mark.parametrize("kind,rank", [("lokr", 2), ("lokr", 64), ("loha", 2)])
def test_comfyui_files_hold_lycoris_factors_on_the_fused_release_modules(kind, rank, tmp_path):
    """The ComfyUI file's factors, applied as ComfyUI's LyCORIS loader applies them to the release's single-file
    weights, give the merged model's weights (rank 64: LoKr's two whole factors, scaled by 1 there). Bugs
    caught: factors under other names or modules, alpha / rank lost or applied twice, dora written where the
    format has no name for it."""
    from safetensors.torch import load_file

    from flowmatch.families import family_of
    from flowmatch.families.convert import save_original
    from flowmatch.models.convert.adapters import to_adapter_file

    lora = LoraConfig(rank=rank, alpha=3.0, kind=kind)
    ours, chosen = adapted("sd3-medium", lora)
    randomise_adapters(ours)
    adapters = {k: v for k, v in ours.state_dict().items() if is_adapter(k)}
    fmt = family_of(ours.cfg).lora_formats["comfyui"]
    tensors, _ = to_adapter_file(adapters, chosen, lora, fmt, ours.cfg)
    base_model = from_diffusers(diffusers_model("sd3-medium"))
    merged = MMDiT(ours.cfg)
    merged.load_state_dict(merge_adapters(base_model.state_dict(), adapters, chosen, lora))
    base = load_file(save_original(base_model, tmp_path / "base.safetensors", prefix=""))
    want = load_file(save_original(merged, tmp_path / "merged.safetensors", prefix=""))
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        assert key.startswith("diffusion_model.")
        module, factor = key[len("diffusion_model."):].rsplit(".", 1)
        modules.setdefault(module, {})[factor] = t
    assert any(m.endswith("attn.qkv") for m in modules) and len(modules) == len(chosen)
    for module, fs in modules.items():
        got = base[f"{module}.weight"] + lycoris_delta(fs)
        assert rel_err(got, want[f"{module}.weight"]) < REL_TOL, module
    untouched = set(base) - {f"{m}.weight" for m in modules}
    assert all(torch.equal(base[k], want[k]) for k in untouched)
    dora = LoraConfig(rank=2, kind="dora")
    ours, chosen = adapted("sd3-medium", dora)
    with pytest.raises(ValueError, match="comfyui LoRA format cannot express dora.*--merge"):
        to_adapter_file({k: v for k, v in ours.state_dict().items() if is_adapter(k)}, chosen, dora, fmt, ours.cfg)



def test_parameter_counts_of_each_kind_follow_their_shapes(monkeypatch):
    """benchmarks/adapter_params.py's counts on a tiny shape: DoRA adds one magnitude per output row to LoRA, LoHa
    is two LoRAs, LoKr's Kronecker factors are far fewer. Bug caught: counting the frozen base or another kind."""
    from benchmarks import adapter_params

    monkeypatch.setitem(adapter_params.SHAPES, "tiny-sd3-medium", dict(in_channels=4, context_dim=20, pooled_dim=12))
    count = {k: adapter_params.trainable("tiny-sd3-medium", LoraConfig(rank=2, kind=k))[0] for k in KINDS + ["lora"]}
    model = MMDiT(config_from_preset("tiny-sd3-medium", **adapter_params.SHAPES["tiny-sd3-medium"]), device="meta")
    chosen = apply_lora(model, LoraConfig(rank=2))
    linears = dict(model.named_modules())
    rows = sum(linears[p.ours].base_layer.out_features for p in chosen)
    assert count["lora"] == sum(2 * (m.in_features + m.out_features) for m in
                                (linears[p.ours].base_layer for p in chosen))
    assert count["dora"] == count["lora"] + rows and count["loha"] == 2 * count["lora"]
    assert 0 < count["lokr"] < count["lora"]
