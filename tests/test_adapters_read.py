"""`model.lora.init_from` for the other adapter kinds: DoRA, LoHa and LoKr files in each format that expresses
them (peft's keys in diffusers' format; LyCORIS' keys in the ComfyUI and kohya layouts) read back onto the model's
adapters, and the errors for files that do not fit."""

from __future__ import annotations

import pytest
import torch

from flowmatch.engine.state import write_safetensors
from flowmatch.families import family_of
from flowmatch.families.lora import apply_lora, load_lora_file
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.adapters import to_adapter_file
from flowmatch.models.lora import LoraConfig, is_adapter
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture
from tests.test_lora import randomise_adapters

SIZES = dict(in_channels=4, context_dim=20, pooled_dim=12)
#: (preset, kind, rank, formats): SD3's fused q/k/v in the release layouts, FLUX's q/k/v (and the single blocks'
#: MLP input) split in diffusers'.
#: LoKr at rank 64 has two whole Kronecker factors (LyCORIS scales them by 1: the scale is folded in and out).
CASES = [("tiny-sd3-medium", "dora", 2, ("diffusers",)),
         ("tiny-flux-dev", "dora", 2, ("diffusers",)),
         ("tiny-sd3-medium", "loha", 2, ("diffusers", "comfyui", "kohya")),
         ("tiny-sd3-medium", "lokr", 2, ("comfyui", "kohya")),
         ("tiny-sd3-medium", "lokr", 64, ("comfyui",))]


def adapted(preset: str, lora: LoraConfig, seed: int) -> tuple[MMDiT, list]:
    model = MMDiT(config_from_preset(preset, **SIZES))
    torch.manual_seed(seed)
    with torch.no_grad():  # zero-initialised layers, as if trained: DoRA divides by each row's norm
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    chosen = apply_lora(model, lora)
    return model, chosen


def adapters_of(model: MMDiT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter(k)}


@pytest.mark.parametrize("preset, kind, rank, formats", CASES)
def test_each_kind_reads_back_from_every_format_that_expresses_it(preset, kind, rank, formats, tmp_path):
    """Bugs caught: a fused projection's output-side factors (B, magnitude, hada_w*_a, lokr_w1) joined in another
    order than written, its shared input factors stacked, the file's scale (alpha / rank, LyCORIS' 1 for whole
    LoKr factors) not folded back or folded into the wrong factor, a factor name read as another kind's."""
    lora = LoraConfig(rank=rank, alpha=3.0, kind=kind)
    source, chosen = adapted(preset, lora, seed=0)
    randomise_adapters(source)
    want = adapters_of(source)
    for name in formats:
        fmt = family_of(source.cfg).lora_formats[name]
        path = tmp_path / f"{kind}-{name}.safetensors"
        write_safetensors(path, *to_adapter_file(want, chosen, lora, fmt, source.cfg))
        target, _ = adapted(preset, lora, seed=1)
        assert load_lora_file(target, lora, str(path)) == name
        got = adapters_of(target)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6, msg=f"{name}: {key}")


def test_adapter_files_that_do_not_fit_are_errors(tmp_path):
    """Never a partial or mistaken load: a LoRA file read as DoRA (no magnitude), a LoHa file under kind lokr, a
    file missing one of a fused projection's modules, another rank. Bugs caught: the magnitude left at its fresh
    value, a kind check that only looks at the first key, a q/k/v adapter missing one part filled with zeros."""
    dora = LoraConfig(rank=2, alpha=3.0, kind="dora")
    model, chosen = adapted("tiny-flux-dev", dora, seed=0)
    randomise_adapters(model)
    dora_file = to_adapter_file(adapters_of(model), chosen, dora, family_of(model.cfg).lora_formats["diffusers"],
                                model.cfg)
    plain = {k: v for k, v in dora_file[0].items() if "magnitude" not in k}
    write_safetensors(tmp_path / "lora.safetensors", plain, dora_file[1])
    with pytest.raises(ValueError, match="holds lora adapters, model.lora.kind is dora"):
        load_lora_file(adapted("tiny-flux-dev", dora, 1)[0], dora, str(tmp_path / "lora.safetensors"))
    part = {k: v for k, v in dora_file[0].items() if not k.startswith("transformer.transformer_blocks.0.attn.to_k.")}
    write_safetensors(tmp_path / "part.safetensors", part, dora_file[1])
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn.to_k has no adapter.*joint_blocks.0.img.qkv"):
        load_lora_file(adapted("tiny-flux-dev", dora, 1)[0], dora, str(tmp_path / "part.safetensors"))

    loha = LoraConfig(rank=2, alpha=3.0, kind="loha")
    model, chosen = adapted("tiny-sd3-medium", loha, seed=0)
    kohya = family_of(model.cfg).lora_formats["kohya"]
    write_safetensors(tmp_path / "loha.safetensors", *to_adapter_file(adapters_of(model), chosen, loha, kohya,
                                                                      model.cfg))
    lokr = LoraConfig(rank=2, alpha=3.0, kind="lokr")
    with pytest.raises(ValueError, match="holds loha adapters, model.lora.kind is lokr"):
        load_lora_file(adapted("tiny-sd3-medium", lokr, 1)[0], lokr, str(tmp_path / "loha.safetensors"))
    wider = LoraConfig(rank=4, alpha=3.0, kind="loha")
    with pytest.raises(ValueError, match=r"factors differ in shape.*\(64, 2\) in the file, \(64, 4\).*model.lora.rank"):
        load_lora_file(adapted("tiny-sd3-medium", wider, 1)[0], wider, str(tmp_path / "loha.safetensors"))
