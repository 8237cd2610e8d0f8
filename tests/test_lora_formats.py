"""LoRA files in every format of each family: written by flowmatch, read back by `model.lora.init_from`, errors
for files that do not fit, and `flowmatch lora check` on each family's tiny pipeline for every export format
(diffusers' `load_lora_weights`, or the file merged into the release weights as ComfyUI merges it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowmatch.cli import main
from flowmatch.engine.state import write_safetensors
from flowmatch.families import family_of
from flowmatch.families.convert import from_diffusers, read_config
from flowmatch.families.lora import apply_file_adapters, apply_lora, load_lora_file, select
from flowmatch.families.presets import config_from_preset
from flowmatch.lora_check import check_lora
from flowmatch.models.convert.adapters import to_adapter_file
from flowmatch.models.convert.lora import to_lora_file
from flowmatch.models.convert.lora_read import file_adapters
from flowmatch.models.lora import LoraConfig, adapter_key, is_adapter, linear_shapes
from flowmatch.models.mmdit import MMDiT
from tests.interop_models import one_thread  # noqa: F401 - applies the module-wide fixture

SIZES = dict(in_channels=4, context_dim=20, pooled_dim=12)
#: Each family's tiny preset and the release's name of its first block's image q projection (fused or split).
PRESETS = {"tiny-sd3-medium": "joint_blocks.0.x_block.attn.qkv",
           "tiny-sd3.5-medium": "joint_blocks.0.x_block.attn.qkv",
           "tiny-flux-dev": "double_blocks.0.img_attn.qkv",
           "tiny-flux-kontext-dev": "double_blocks.0.img_attn.qkv",
           "tiny-chroma": "double_blocks.0.img_attn.qkv",
           "tiny-qwen-image": "transformer_blocks.0.attn.to_q",
           "tiny-qwen-image-edit": "transformer_blocks.0.attn.to_q",
           "tiny-lumina2": "layers.0.attention.qkv",
           "tiny-flux2-klein-4b": "double_blocks.0.img_attn.qkv"}
LORA = LoraConfig(rank=3, alpha=7.0)  # alpha != rank: a lost scale shows
CHECK = dict(prompts=["a photo of a cat", "a red apple"], steps=2, size=32, guidance=3.0)


def adapted_model(cfg, lora: LoraConfig = LORA, seed: int = 1) -> tuple[MMDiT, list, dict]:
    """(model with random adapters, the adapted projections, the adapter tensors)."""
    model = family_of(cfg).build(cfg)
    torch.manual_seed(0)
    chosen = apply_lora(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, chosen, {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter(k)}


def fresh(cfg, lora: LoraConfig = LORA) -> MMDiT:
    model = family_of(cfg).build(cfg)
    torch.manual_seed(5)
    apply_lora(model, lora)
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_every_format_reads_back_bit_for_bit(preset, tmp_path):
    """Bugs caught: a fused projection's B rows stacked in another order than written, the shared A of split
    modules not recognised (rank tripled), alpha not folded or folded twice, kohya names built differently by the
    writer and the reader, SD3's last text block's Tail rows not dropped, the format guessed wrong, a family's
    table not registered (only diffusers' format found), ComfyUI's files under peft's factor names."""
    pooled = config_from_preset(preset).pooled_dim != 0  # Chroma and Qwen-Image take no pooled vector
    cfg = config_from_preset(preset, **{k: v for k, v in SIZES.items() if pooled or k != "pooled_dim"})
    _, chosen, want = adapted_model(cfg)
    family = family_of(cfg)
    assert {"diffusers", "comfyui", "kohya"} <= family.lora_formats.keys()
    for name, fmt in family.lora_formats.items():
        tensors, metadata = to_lora_file(want, chosen, LORA, fmt, cfg)
        if name == "kohya":
            assert all(k.startswith("lora_unet_") for k in tensors)
            assert f"lora_unet_{PRESETS[preset].replace('.', '_')}.lora_down.weight" in tensors
            assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {7.0}
        if name == "comfyui" and fmt.fold_alpha:  # Lumina-2's: the names diffusers' converter reads, no alpha
            assert all(k.startswith("diffusion_model.") for k in tensors) and not any(".alpha" in k for k in tensors)
            assert f"diffusion_model.{PRESETS[preset]}.lora_A.weight" in tensors and metadata == {"format": "pt"}
        elif name == "comfyui":  # ComfyUI's own LoRA writer's names: dotted modules, kohya's factor names
            assert all(k.startswith("diffusion_model.") for k in tensors) and not any(".lora_A." in k for k in tensors)
            assert f"diffusion_model.{PRESETS[preset]}.lora_down.weight" in tensors
        if name == "diffusers":
            assert not any(".qkv." in k for k in tensors) and any(".attn.to_k.lora_A" in k for k in tensors)
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, tensors, metadata)
        model = fresh(cfg)
        assert load_lora_file(model, LORA, str(path)) == name
        got = {k: v for k, v in model.state_dict().items() if is_adapter(k)}
        assert got.keys() == want.keys()
        if fmt.fold_alpha:  # B x scale / scale: equal to rounding
            assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=0) for k in want), name
        else:
            assert all(torch.equal(got[k], want[k]) for k in want), name


def test_other_trainers_split_modules_and_scales_fuse_exactly():
    """A file with its own A per q/k/v module, its own alphas and a smaller rank than the recipe's: one fused
    adapter of rank 3 r (block-diagonal B) padded to the recipe's rank, the same update. Bug caught: B stacked
    against the first module's A only, or a per-module alpha ignored."""
    cfg = config_from_preset("tiny-flux-dev", **SIZES)
    fmt = family_of(cfg).lora_formats["diffusers"]
    g = torch.Generator().manual_seed(3)
    d = cfg.width
    tensors, update = {}, []
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        a, b = torch.randn(2, d, generator=g), torch.randn(d, 2, generator=g)
        key = f"transformer.transformer_blocks.0.attn.{name}"
        tensors.update({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b,
                        f"{key}.alpha": torch.tensor(float(i + 1))})
        update.append((i + 1) / 2 * b @ a)
    found = file_adapters(tensors, {}, {"diffusers": fmt}, cfg, scale=LORA.scale)
    a, b = found.adapters["joint_blocks.0.img.qkv"]
    assert a.shape[0] == 6
    torch.testing.assert_close(LORA.scale * b @ a, torch.cat(update), rtol=1e-5, atol=1e-5)


def write(tmp_path: Path, tensors: dict, name: str = "x.safetensors") -> str:
    write_safetensors(tmp_path / name, tensors, {"format": "pt"})
    return str(tmp_path / name)


def test_files_that_do_not_fit_are_errors_naming_counts_and_examples(tmp_path):
    """Never a partial load: keys of another model, keys beyond the model (Lumina-2's comfyui file too), a part of
    the targets, a larger rank, a pickle; an adapter kind Lumina-2's comfyui file cannot hold. Bugs caught:
    unmatched keys skipped silently, targets left at their fresh values, a LoHa written as LoRA-less diffusers keys
    under Lumina-2's comfyui name."""
    sd3 = config_from_preset("tiny-sd3-medium", **SIZES)
    flux = config_from_preset("tiny-flux-dev", **SIZES)
    _, chosen, adapters = adapted_model(flux)
    flux_file = to_lora_file(adapters, chosen, LORA, family_of(flux).lora_formats["kohya"], flux)[0]
    with pytest.raises(ValueError, match=r"kohya format\): 60 of its 63 keys match no module.*lora_unet_double_blocks"):
        load_lora_file(fresh(sd3), LORA, write(tmp_path, flux_file))

    _, chosen, adapters = adapted_model(sd3)
    kohya = to_lora_file(adapters, chosen, LORA, family_of(sd3).lora_formats["kohya"], sd3)[0]
    extra = {**kohya, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(3, 4),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match=r"kohya format\): 2 of its \d+ keys match no module.*lora_te1_text"):
        load_lora_file(fresh(sd3), LORA, write(tmp_path, extra))
    part = {k: v for k, v in kohya.items() if "joint_blocks_1_" not in k}
    with pytest.raises(ValueError, match=r"holds no adapter for 3 of the 7 modules.*joint_blocks.1"):
        load_lora_file(fresh(sd3), LORA, write(tmp_path, part))
    narrow = LoraConfig(rank=3, alpha=7.0, targets=["attn.to_out.0"])
    with pytest.raises(ValueError, match=r"adapts 5 modules that model.lora.targets leaves out.*lora_unet_joint"):
        load_lora_file(fresh(sd3, narrow), narrow, write(tmp_path, kohya))
    with pytest.raises(ValueError, match="needs rank 3 .*model.lora.rank = 2.*rank: 3"):
        load_lora_file(fresh(sd3, LoraConfig(rank=2)), LoraConfig(rank=2), write(tmp_path, kohya))
    lumina = config_from_preset("tiny-lumina2", **{k: v for k, v in SIZES.items() if k != "pooled_dim"})
    _, chosen, adapters = adapted_model(lumina)
    comfyui = family_of(lumina).lora_formats["comfyui"]
    stray = {**to_lora_file(adapters, chosen, LORA, comfyui, lumina)[0],
             "diffusion_model.cap_embedder.2.lora_A.weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"comfyui format\): 1 of its \d+ keys match no module.*cap_embedder.2"):
        load_lora_file(fresh(lumina), LORA, write(tmp_path, stray))
    with pytest.raises(ValueError, match="comfyui LoRA format of this family cannot express loha.*--merge"):
        to_adapter_file({}, [], LoraConfig(kind="loha"), comfyui, lumina)
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors files are read"):
        load_lora_file(fresh(sd3), LORA, str(pickle))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "x.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file.*truncated"):
        load_lora_file(fresh(sd3), LORA, str(truncated))


#: Family kind -> its tiny pipeline's session fixture (tests/conftest.py).
PIPELINES = {"sd3-medium": "tiny_sd3_pipeline", "sd3.5-medium": "tiny_sd35_pipeline", "flux-dev": "tiny_flux_pipeline",
             "kontext": "tiny_kontext_pipeline", "chroma": "tiny_chroma_pipeline", "qwen-image": "tiny_qwen_pipeline",
             "qwen-image-edit": "tiny_qwen_edit_pipeline", "lumina2": "tiny_lumina2_pipeline",
             "zimage": "tiny_zimage_pipeline"}


@pytest.fixture(scope="module")
def lora_files(request, tmp_path_factory):
    """``files(kind) -> (pipeline folder, {format: file})`` of random rank-4, alpha-8 adapters on the transformer of
    the family's tiny pipeline, each pipeline built and its files written on first use."""
    out = {}
    lora = LoraConfig(rank=4, alpha=8.0)

    def files(kind: str) -> tuple[Path, dict]:
        if kind not in out:
            pipeline = request.getfixturevalue(PIPELINES[kind])
            model = from_diffusers(pipeline)
            _, chosen, adapters = adapted_model(model.cfg, lora)
            folder = tmp_path_factory.mktemp(f"lora-{kind}")
            written = {}
            for name, fmt in family_of(model.cfg).lora_formats.items():
                if fmt.writes:
                    written[name] = folder / f"{name}.safetensors"
                    write_safetensors(written[name], *to_lora_file(adapters, chosen, lora, fmt, model.cfg))
            out[kind] = (pipeline, written)
        return out[kind]

    return files


#: (family kind, format, the reference that applies it). diffusers converts Qwen-Image's ComfyUI and kohya files
#: itself; it has no converter for SD3's, and its FLUX converter (which Kontext and Chroma use) hard-codes FLUX.1's
#: widths (benchmarks/lora_formats_diffusers.py runs it at those): the merge stands in. The editing pipelines
#: share their base family's tables and are checked on a reference image (--image).
CHECKS = [(kind, fmt, "diffusers" if fmt == "diffusers" else "merged") for kind in ("sd3-medium", "sd3.5-medium",
                                                                                    "flux-dev", "chroma")
          for fmt in ("diffusers", "comfyui", "kohya")]
CHECKS += [("qwen-image", fmt, "diffusers") for fmt in ("diffusers", "comfyui", "kohya")]
CHECKS += [("kontext", "diffusers", "diffusers"), ("kontext", "kohya", "merged"),
           ("qwen-image-edit", "diffusers", "diffusers"), ("qwen-image-edit", "comfyui", "diffusers")]
# Lumina-2: diffusers splits the comfyui file's q/k/v at the release's widths (the test at those widths is
# test_lumina2_comfyui_file_is_the_one_diffusers_lumina2_converter_reads) and converts no kohya file.
CHECKS += [("lumina2", "diffusers", "diffusers"), ("lumina2", "comfyui", "merged"), ("lumina2", "kohya", "merged")]
CHECKS += [("zimage", fmt, "diffusers") for fmt in ("diffusers", "comfyui", "kohya")]


#: The editing pipelines' reference sizes at the test's scale: a few hundred pixels instead of a megapixel.
REFERENCE_AREA = 48 * 48


@pytest.fixture
def small_references(monkeypatch):
    """FluxKontextPipeline and QwenImageEditPipeline, in diffusers and in flowmatch, resizing references to about
    REFERENCE_AREA pixels instead of a megapixel."""
    from diffusers.pipelines.flux import pipeline_flux_kontext
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    import flowmatch.families.kontext as kontext
    import flowmatch.families.qwen_image_edit as qwen_image_edit

    resolutions = ((40, 56), (48, 48), (56, 40))
    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", resolutions)
    monkeypatch.setattr(kontext, "KONTEXT_RESOLUTIONS", resolutions)
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: original(REFERENCE_AREA, ratio))
    monkeypatch.setattr(qwen_image_edit.reference_size, "__kwdefaults__", {"area": REFERENCE_AREA})


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory) -> Path:
    """A small random RGB PNG, wider than high (not the target's size or aspect)."""
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    Image.fromarray((torch.rand(36, 52, 3, generator=g) * 255).byte().numpy()).save(path)
    return path


@pytest.mark.parametrize("kind, fmt, reference", CHECKS)
def test_lora_check_agrees_for_every_family_and_format(lora_files, kind, fmt, reference, small_references,
                                                       reference_png, capsys):
    """The parity figures: flowmatch's LoRA images against diffusers' load_lora_weights or the ComfyUI-style merge
    into the release weights, same noise (and, for the editing families, the same reference image). Bugs caught:
    a family's kohya or ComfyUI names that its tools spell otherwise (diffusers' Qwen-Image converter, the merge by
    name), ChromaPipeline's float mask or Qwen-Image's unguided default taken as a LoRA difference, the reference
    image not reaching one side."""
    pipeline, files = lora_files(kind)
    editing = family_of(read_config(pipeline)).capabilities.references > 0
    result = check_lora(files[fmt], pipeline, **CHECK, image=reference_png if editing else None)
    print(f"{kind} {fmt}: reference {result.reference}, max diff {result.max_diff:.2e}, effect {result.effect:.2e}")
    assert result.format == fmt and result.passed, result.describe()
    assert result.reference == reference, result.describe()


def test_lora_check_command_exit_codes(lora_files, tmp_path, reference_png, capsys):
    """Exit 0 when both agree; 1 when diffusers cannot apply the file (its SD3 loader reads no ComfyUI keys), and 1
    for a file without effect. diffusers has no converter for SD3's kohya (or ComfyUI) keys: the check says so in
    one line and compares with the merged weights. A reference image for a text-to-image family is an error, as is
    an editing family without one. Bugs caught: the verdict not reaching the exit status, diffusers' no-op taken as
    agreement, the fallback unexplained, --image ignored."""
    pipeline, files = lora_files("sd3-medium")
    args = ["--base", str(pipeline), "--steps", "2", "--size", "32"]
    assert main(["lora", "check", str(files["kohya"]), *args]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "max |flowmatch - merged|" in out
    assert any("StableDiffusion3Pipeline.load_lora_weights loads nothing from it" in line
               and "checked against the file merged into the release's single-file weights" in line
               for line in out.splitlines()), out
    assert main(["lora", "check", str(files["diffusers"]), *args, "--image", str(reference_png)]) == 1
    assert "the sd3 family is text to image" in capsys.readouterr().err
    kontext, kontext_files = lora_files("kontext")
    assert main(["lora", "check", str(kontext_files["diffusers"]), "--base", str(kontext)]) == 1
    assert "the kontext family edits a reference image" in capsys.readouterr().err
    assert main(["lora", "check", str(kontext_files["diffusers"]), "--base", str(kontext), "--image",
                 str(tmp_path / "missing.png")]) == 1
    assert "missing.png does not exist" in capsys.readouterr().err
    assert main(["lora", "check", str(files["comfyui"]), *args, "--reference", "diffusers"]) == 1
    out = capsys.readouterr().out
    # diffusers' SD3 loader refuses the alpha keys; without them it would load nothing, silently.
    assert "FAIL: no reference applies the file" in out and "StableDiffusion3Pipeline.load_lora_weights" in out
    from safetensors.torch import load_file
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(files["diffusers"]).items()}
    write_safetensors(tmp_path / "zero.safetensors", zero, {"format": "pt"})
    assert main(["lora", "check", str(tmp_path / "zero.safetensors"), *args]) == 1
    assert "no effect" in capsys.readouterr().out


def test_lora_check_fails_when_the_two_differ(lora_files, monkeypatch):
    """Bug caught: the verdict ignoring the difference. Flowmatch's side is made to apply 1.05 times the update: a
    difference above the tolerance yet well under a tenth of the effect, so only the tolerance can fail it."""
    import flowmatch.lora_check as lora_check

    def doubled(model, found):
        found.adapters = {k: (a, 1.05 * b) for k, (a, b) in found.adapters.items()}
        return apply_file_adapters(model, found)

    monkeypatch.setattr(lora_check, "apply_file_adapters", doubled)
    pipeline, files = lora_files("flux-dev")
    result = check_lora(files["diffusers"], pipeline, **CHECK)
    assert not result.passed and 1e-3 < result.max_diff < result.effect / 10
    assert result.describe().startswith("FAIL: flowmatch and diffusers differ")


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_flux_kohya_and_comfyui_names_are_the_ones_diffusers_converter_reads(fmt):
    """diffusers converts kohya and ComfyUI FLUX files itself (ComfyUI's by its kohya suffixes: lora_down /
    lora_up); every module its converter finds gets the update of our diffusers format (its converter hard-codes
    FLUX.1's single-block widths, so the single blocks' linear1 is left out at these sizes). Bugs caught: a module
    name diffusers (and sd-scripts, ComfyUI) spell otherwise, alpha not written, ComfyUI's file under peft's
    factor names (which diffusers' FLUX loader loads nothing from)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    cfg = config_from_preset("tiny-flux-dev", **SIZES)
    _, chosen, adapters = adapted_model(cfg)
    formats = family_of(cfg).lora_formats
    tensors = {k: v for k, v in to_lora_file(adapters, chosen, LORA, formats[fmt], cfg)[0].items()
               if "_linear1." not in k and ".linear1." not in k}
    assert any(".lora_down.weight" in k for k in tensors)  # what diffusers' FLUX loader takes for kohya-converted
    theirs = _convert_kohya_flux_lora_to_diffusers(tensors)
    ours = to_lora_file(adapters, chosen, LORA, formats["diffusers"], cfg)[0]
    fused_singles = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_mlp")
    want = {k[:-len(".lora_A.weight")] for k in ours if k.endswith(".lora_A.weight")
            and not (".single_transformer_blocks." in k and any(p + "." in k for p in fused_singles))}
    # diffusers 0.42.1 names the final layer's adapter `proj_out` without the `transformer.` its loader keeps (so
    # load_lora_weights drops it) and leaves its alpha out ("TODO: alphas"): names compared without the prefix,
    # that layer's update not compared.
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    ours = {k.removeprefix("transformer."): v for k, v in ours.items()}
    want = {m.removeprefix("transformer.") for m in want}
    got = {k[:-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")}
    assert got == want and len(got) > 20
    for module in got - {"proj_out"}:
        update = theirs[f"{module}.lora_B.weight"] @ theirs[f"{module}.lora_A.weight"]
        want_update = LORA.scale * ours[f"{module}.lora_B.weight"] @ ours[f"{module}.lora_A.weight"]
        torch.testing.assert_close(update, want_update, msg=module)


def test_lumina2_comfyui_file_is_the_one_diffusers_lumina2_converter_reads():
    """diffusers' Lumina-2 converter (what Lumina2Pipeline.load_lora_weights runs on ``diffusion_model.`` keys)
    splits q/k/v at the release's widths, so the file is written at those (one block of each kind, the adapters
    only: no model is built). Every module it makes has our diffusers file's update, zero on the blocks'
    projections the default (attention) targets leave out. Bugs caught: alpha not folded into B (diffusers takes
    alpha = rank), an ``.alpha`` key or kohya's lora_down names (its converter refuses or misses them), a block's
    feed-forward or modulation left out of the file (its converter pops each by name), q/k/v rows in another
    order than the release's."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    cfg = config_from_preset("lumina2", depth=1, refiner_layers=1)
    formats, chosen, shapes = family_of(cfg).lora_formats, select(cfg, None), linear_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    adapters = {}
    for proj in chosen:
        out_features, in_features = shapes[proj.ours]
        adapters[adapter_key(proj.ours, "A")] = torch.randn(LORA.rank, in_features, generator=g)
        adapters[adapter_key(proj.ours, "B")] = torch.randn(out_features, LORA.rank, generator=g)
    theirs = _convert_non_diffusers_lumina2_lora_to_diffusers(to_lora_file(adapters, chosen, LORA,
                                                                           formats["comfyui"], cfg)[0])
    ours = to_lora_file(adapters, chosen, LORA, formats["diffusers"], cfg)[0]
    modules = {k[:-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")}
    adapted = {k[:-len(".lora_A.weight")] for k in ours if k.endswith(".lora_A.weight")}
    assert len(modules) == 23 and adapted < modules and len(adapted) == 12  # 3 blocks: 4 attention modules each
    for module in modules:
        update = theirs[f"{module}.lora_B.weight"] @ theirs[f"{module}.lora_A.weight"]
        if module in adapted:
            want = LORA.scale * ours[f"{module}.lora_B.weight"] @ ours[f"{module}.lora_A.weight"]
            torch.testing.assert_close(update, want, msg=module)
        else:
            assert not update.any(), module
