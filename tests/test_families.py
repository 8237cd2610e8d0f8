"""The family registry (flowmatch.families): every family builds and runs its tiny preset and round-trips its
converter bit for bit, recipes written before ``model.family`` keep their family, a checkpoint of one family is
refused as another naming both, the objective and text-layout registries answer for their names, and no module
outside the registries compares family or objective names (an AST scan: a new ``if cfg.kind == "mmdit"`` fails it).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from flowmatch.conditioning import Conditioning
from flowmatch.config import RecipeError, load_recipe
from flowmatch.families import FAMILIES, MODEL_KINDS, PIPELINES, build_backbone, family_of, get_family, text_layout
from flowmatch.families.config import ModelConfig
from flowmatch.families.convert import convert_original, from_diffusers, from_original, to_diffusers, to_original
from flowmatch.families.presets import PRESET_FAMILY, PRESETS, config_from_preset, preset_values
from flowmatch.flow import OBJECTIVES, get_objective
from flowmatch.init_from import with_architecture
from flowmatch.sampling.diffusers_schedule import PipelineGrid

PACKAGE = Path(__file__).resolve().parents[1] / "flowmatch"
#: Sizes the encoders would fill in.
SIZES = dict(in_channels=4, context_dim=20, pooled_dim=12)
#: Names no module outside the registries may compare: the families, the backbones model.kind names, the objectives,
#: the diffusers pipeline classes.
NAMES = {*FAMILIES, *MODEL_KINDS, *OBJECTIVES, *PIPELINES}
#: The registries, which may: the families' room, and the objective registry.
REGISTRIES = ("families/", "flow/objectives.py")


def _tiny(family) -> ModelConfig:
    values = preset_values(family.tiny)
    return ModelConfig(**{**values, **{k: v for k, v in SIZES.items() if values[k] is None}})


def test_the_registry_lists_each_family_once_with_its_presets():
    assert list(FAMILIES) == ["sd3", "flux", "kontext", "qwen_image", "qwen_image_edit", "chroma", "zimage", "lumina2",
                              "flux2", "unet"]
    assert set(MODEL_KINDS) == {"mmdit", "unet"}
    assert {name for f in FAMILIES.values() for name in f.presets} == set(PRESETS)
    assert all(PRESET_FAMILY[f.tiny] is f for f in FAMILIES.values())
    with pytest.raises(ValueError, match="model.family.*did you mean 'flux'"):
        get_family("flx")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_builds_and_runs_its_tiny_preset(name):
    family = FAMILIES[name]
    cfg = _tiny(family)
    assert family_of(cfg) is family
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    x = torch.randn(2, cfg.in_channels, 8, 8)
    cond = Conditioning(torch.randn(2, 5, cfg.context_dim), torch.ones(2, 5, dtype=torch.bool),
                        torch.randn(2, cfg.pooled_dim))
    if cfg.guidance_embed:
        cond = Conditioning(cond.hidden, cond.mask, cond.pooled, {"guidance": torch.full((2,), 3.5)})
    if family.capabilities.references:  # an editing family: with as many reference images as it takes
        cond = cond.with_reference([torch.randn(2, cfg.in_channels, 4, 6)] * family.capabilities.references)
    with torch.no_grad():
        assert model(x, torch.rand(2), cond).shape == x.shape
    flops = family.flops(cfg, batch_size=4, latent_size=(8, 8), text_len=5)
    assert flops > 0


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.converter is not None])
def test_every_converter_round_trips_its_tiny_preset_bit_for_bit(name):
    family = FAMILIES[name]
    torch.manual_seed(0)
    ours = family.build(_tiny(family).architecture())
    theirs = to_diffusers(ours)
    assert type(theirs).__name__ == family.converter.DIFFUSERS_CLASS
    # The original keys store neither SD3's sample_size, FLUX's RoPE split nor Kontext's reference count: given as
    # the model has them. A diffusers transformer shared by two families (FLUX, Kontext) is told by its pipeline.
    unstored = dict(sample_size=ours.cfg.sample_size, rope_axes_dim=ours.cfg.rope_axes_dim,
                    references=ours.cfg.references)
    for back in (from_diffusers(theirs, pipeline_class=family.diffusers.pipeline_class),
                 from_original(to_original(ours), **unstored)):
        assert family_of(back.cfg) is family
        for (key, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), key
    # The original keys name the family again (from the keys alone, with no config recorded).
    assert family_of(convert_original(to_original(ours), **unstored).cfg) is family


def test_sections_without_a_family_keep_theirs_and_a_stated_one_must_fit():
    """Bugs caught: inferring FLUX from anything but RoPE, model.kind: unet read as an MMDiT, a stated family that
    the section contradicts accepted silently."""
    assert family_of(load_recipe(None, ["model.preset=tiny"]).model).name == "sd3"
    assert family_of(load_recipe(None, ["model.preset=tiny-flux-dev"]).model).name == "flux"
    assert family_of(load_recipe(None, ["model.preset=digits-unet"]).model).name == "unet"
    assert family_of(config_from_preset("tiny", rope=True)).name == "flux"  # converted configs have no kind
    assert family_of(config_from_preset("tiny-qwen-image")).name == "qwen_image"  # MSRoPE, not FLUX's RoPE
    # MSRoPE with a reference image: Qwen-Image-Edit, not Qwen-Image (nor Kontext, whose RoPE is FLUX's)
    assert family_of(config_from_preset("tiny-qwen-image", references=1)).name == "qwen_image_edit"
    assert load_recipe(None, ["model.preset=digits-unet", "model.family=unet"]).model.kind == "unet"
    with pytest.raises(ValueError, match="model.family: flux.*sd3"):
        load_recipe(None, ["model.preset=tiny", "model.family=flux"])
    with pytest.raises(ValueError, match="model.init_from and model.lora.*model.family: unet"):
        ModelConfig(**preset_values("digits-unet"), init_from="some/weights")


def test_a_checkpoint_of_one_family_is_refused_as_another_naming_both():
    model = ModelConfig(**{**preset_values("tiny"), **SIZES}, family="sd3", init_from="runs/flux")
    weights = config_from_preset("tiny-flux-dev", **SIZES)
    with pytest.raises(RecipeError, match="model.family: sd3.*flux weights"):
        with_architecture(model, weights)
    assert with_architecture(dataclasses.replace(model, family=None), weights).rope  # the family follows the weights
    # FLUX.1-layout weights say nothing of reference images: a Kontext recipe takes them as Kontext's.
    kontext = ModelConfig(**{**preset_values("tiny-flux-kontext-dev"), **SIZES}, family="kontext",
                          init_from="flux1-kontext-dev.safetensors")
    assert with_architecture(kontext, weights).references == 1
    with pytest.raises(RecipeError, match="model.family: sd3.*kontext weights"):
        with_architecture(model, dataclasses.replace(weights, references=1))


def test_objectives_and_text_layouts_answer_for_their_names():
    """Bugs caught: the loop running the JVP for shortcut, or skipping the interval checks for meanflow."""
    assert list(OBJECTIVES) == ["flow", "meanflow", "shortcut"]
    flow, meanflow, shortcut = (get_objective(n) for n in OBJECTIVES)
    assert (flow.interval, flow.uses_jvp) == (False, False)
    assert (meanflow.interval, meanflow.uses_jvp) == (True, True) and "JVP backend exact" in meanflow.describe("exact")
    assert (shortcut.interval, shortcut.uses_jvp) == (True, False)
    with pytest.raises(ValueError, match="did you mean 'meanflow'"):
        get_objective("meanflw")
    assert text_layout("sd3") is FAMILIES["sd3"].text and text_layout("flux") is FAMILIES["flux"].text
    assert text_layout("single").single and not text_layout("sd3").single


def _strings(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for e in node.elts:
            yield from _strings(e)


def name_comparisons(source: str) -> list[str]:
    """The comparisons in ``source`` of a family, model kind or objective name, and FLUX decided by RoPE."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if NAMES & {s for side in (node.left, *node.comparators) for s in _strings(side)}:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.IfExp) and isinstance(node.test, ast.Attribute) and node.test.attr == "rope":
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_a_kind_comparison():
    assert name_comparisons('if cfg.kind == "mmdit":\n    pass\n')
    assert name_comparisons('ok = flow.objective not in ("meanflow", "shortcut")\n')
    assert name_comparisons("arch = flux if cfg.rope else sd3\n")
    assert not name_comparisons('if flow.path == "rectified":\n    pass\n')
    assert name_comparisons('dev = configs.pipeline_class == "Flux2Pipeline"\n')


def test_no_module_outside_the_registries_compares_family_or_objective_names():
    modules = {path.relative_to(PACKAGE).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}
    offenders = [f"{name}:{hit}" for name, path in modules.items() if not name.startswith(REGISTRIES)
                 for hit in name_comparisons(path.read_text())]
    assert not offenders, "ask the family (flowmatch.families) or the objective (flowmatch.flow.get_objective):\n" + \
        "\n".join(offenders)


def test_the_diffusers_schedule_follows_the_family():
    """Bugs caught: FLUX's transformer time not rounded through float32 as FluxPipeline rounds it (a drift the
    pipeline-parity tests' pixel tolerance hides), SD3's guidance not classifier-free, FLUX's default sigmas lost."""
    config = dict(shift=3.0, use_dynamic_shifting=False)
    sd3, flux = PipelineGrid(config, "sd3"), PipelineGrid({**config, "use_dynamic_shifting": True}, "flux")
    t = torch.linspace(0, 1, 1001)
    assert flux.model_time(t).dtype == torch.float32 and torch.equal(flux.model_time(t), (t * 1000) / 1000)
    assert not torch.equal(flux.model_time(t), t) and sd3.model_time(t) is t
    assert (sd3.classifier_free, flux.classifier_free) == (True, False)
    assert flux.grid(4, seq_len=256) == flux.grid(4, seq_len=256, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert sd3.grid(4, seq_len=256) != sd3.grid(4, seq_len=256, sigmas=[1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="did you mean 'flux'"):
        PipelineGrid(config, "flx")
    with pytest.raises(ValueError, match="sd3, flux"):
        PipelineGrid(config, "unet")  # a family without a diffusers pipeline
