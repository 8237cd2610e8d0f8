"""Do diffusers' own loaders apply flowmatch's LoRA files at the released widths? Per family and format.

diffusers converts ComfyUI and kohya LoRA files itself, but its FLUX.1 converter (which FluxKontextPipeline and
ChromaPipeline use too) hard-codes FLUX.1's widths (the single blocks' fused ``linear1`` is split as
3072 + 3072 + 3072 + 12288 rows), and its Lumina-2 converter Lumina-Image-2's (``attention.qkv`` as
2304 + 768 + 768), so the tiny pipelines of the tests cannot show whether it reads our files. Here
each family's transformer is built at its release preset's widths with one or two blocks (random weights, CPU,
float32), random rank-4 adapters are put on the family's default LoRA targets, and each export format is written
as ``flowmatch export --lora --format`` writes it and loaded with the family's diffusers pipeline class's
``load_lora_weights`` (the pipeline holds only the transformer: the loader reads nothing else).

Printed per family and format, weight by weight of diffusers' transformer:

    max |dW diffusers - dW flowmatch|   diffusers' update (peft's ``get_delta_weight`` of each LoRA layer it made)
                                        against ours (scale B A of each adapter, taken to diffusers' names by the
                                        family's key table, as the base weights are), over every weight either
                                        updates, and over those both update
    effect max |dW flowmatch|           the size of the update itself
    modules                             LoRA layers diffusers made / diffusers modules our adapters reach

A loader that refuses the file, or loads nothing from it, is printed as such (the silent no-op users meet).

    python benchmarks/lora_formats_diffusers.py                       # every family (a few GB of memory, minutes)
    python benchmarks/lora_formats_diffusers.py --families flux qwen_image
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from flowmatch.engine.state import write_safetensors
from flowmatch.families import get_family
from flowmatch.families.convert import to_diffusers
from flowmatch.families.lora import apply_lora
from flowmatch.families.presets import config_from_preset
from flowmatch.models.convert.lora import to_lora_file
from flowmatch.models.lora import LoraConfig, adapter_key, is_adapter

#: family -> (release preset, block counts kept, diffusers pipeline class). The editing families' tables are their
#: base family's (flowmatch/families/{kontext,qwen_image_edit}/lora_formats.py); Kontext is run for its pipeline
#: class, Qwen-Image-Edit would repeat Qwen-Image.
CASES = {
    "sd3": ("sd3-medium", dict(depth=2), "StableDiffusion3Pipeline"),
    "flux": ("flux-dev", dict(depth=1, single_blocks=1), "FluxPipeline"),
    "kontext": ("flux-kontext-dev", dict(depth=1, single_blocks=1), "FluxKontextPipeline"),
    "chroma": ("chroma", dict(depth=1, single_blocks=1), "ChromaPipeline"),
    "qwen_image": ("qwen-image", dict(depth=1), "QwenImagePipeline"),
    "lumina2": ("lumina2", dict(depth=1, refiner_layers=1), "Lumina2Pipeline"),
    "zimage": ("zimage", dict(depth=1, refiner_layers=1), "ZImagePipeline"),
    "flux2": ("flux2-klein-4b", dict(depth=1, single_blocks=1), "Flux2KleinPipeline"),
}
LORA = LoraConfig(rank=4, alpha=8.0)
#: The adapters' factors are drawn at this scale: updates of a trained LoRA's order, far above float32 rounding.
FACTOR_SCALE = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def bare_pipeline(class_name: str, transformer):
    """The family's diffusers pipeline holding only ``transformer`` (its LoRA loader reads nothing else)."""
    cls = getattr(diffusers, class_name)
    components = {name: None for name in cls._get_signature_keys(cls)[0]}
    return cls(**{**components, "transformer": transformer})


@torch.no_grad()
def our_updates(model, chosen, family, cfg) -> dict[str, torch.Tensor]:
    """diffusers weight name -> the update our adapters make to it (scale B A through the family's key table)."""
    params = dict(model.named_parameters())
    rules = {rule.ours: rule for rule in family.converter.diffusers_rules(cfg) if rule.ours}
    out = {}
    for proj in chosen:
        a, b = params[adapter_key(proj.ours, "A")], params[adapter_key(proj.ours, "B")]
        rule = rules[f"{proj.ours}.weight"]
        out.update(zip(rule.theirs, rule.op.to_theirs(LORA.scale * b.float() @ a.float(), None, torch.float32)))
    return out


@torch.no_grad()
def their_updates(transformer, adapter: str):
    """(diffusers weight name, update) of each LoRA layer named ``adapter`` that its loader made, one at a time."""
    for name, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
            yield f"{name}.weight", module.get_delta_weight(adapter).float()


def compare(ours: dict[str, torch.Tensor], theirs) -> tuple[int, list[str], float, float]:
    """(LoRA layers diffusers made, the weights we update that it does not, max |theirs - ours| over the weights
    both update, the same over every weight either updates)."""
    applied, overall, seen = 0.0, 0.0, set()
    for key, got in theirs:
        seen.add(key)
        diff = (got - ours[key] if key in ours else got).abs().max().item()
        applied, overall = (max(applied, diff), max(overall, diff)) if key in ours else (applied, max(overall, diff))
    missing = sorted(ours.keys() - seen)
    for key in missing:
        overall = max(overall, ours[key].abs().max().item())
    return len(seen), missing, applied, overall


def run_family(name: str, seed: int, folder: Path) -> list[str]:
    preset, blocks, pipeline_class = CASES[name]
    family = get_family(name)
    cfg = config_from_preset(preset, **blocks)
    torch.manual_seed(seed)
    model = family.build(cfg)
    transformer = to_diffusers(model, copy=False)
    chosen = apply_lora(model, LORA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if is_adapter(key):
                p.copy_(FACTOR_SCALE * torch.randn(p.shape, generator=g))
    adapters = {k: v.detach() for k, v in model.state_dict().items() if is_adapter(k)}
    ours = our_updates(model, chosen, family, cfg)
    effect = max(v.abs().max().item() for v in ours.values())
    pipe = bare_pipeline(pipeline_class, transformer)
    lines = [f"{name} ({preset} widths, {blocks}, {sum(p.numel() for p in transformer.parameters()) / 1e6:.0f}M "
             f"parameters; {len(chosen)} adapted projections, {len(ours)} diffusers modules): {pipeline_class}"]
    for fmt_name, fmt in family.lora_formats.items():
        if not fmt.writes:
            continue
        file = folder / f"{name}-{fmt_name}.safetensors"
        write_safetensors(file, *to_lora_file(adapters, chosen, LORA, fmt, cfg))
        try:
            pipe.load_lora_weights(str(folder), weight_name=file.name, adapter_name=fmt_name)
        except Exception as err:  # noqa: BLE001 - the loader's refusal is the finding
            lines.append(f"  {fmt_name:9s} refused: {type(err).__name__}: {str(err).splitlines()[0][:160] or '-'}")
            continue
        made, missing, applied, diff = compare(ours, their_updates(transformer, fmt_name))
        if not made:
            lines.append(f"  {fmt_name:9s} loads nothing (no LoRA layer made): a silent no-op")
            continue
        lines.append(f"  {fmt_name:9s} max |dW diffusers - dW flowmatch| {diff:.2e} (over the modules diffusers "
                     f"applies {applied:.2e}), effect {effect:.2e}, modules {made}/{len(ours)}"
                     + (f"; not applied: {', '.join(missing[:3])}" if missing else ""))
        pipe.delete_adapters(fmt_name)
    return lines


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-formats-") as tmp:
        for name in args.families:
            start = time.process_time()
            lines = run_family(name, args.seed, Path(tmp))
            gc.collect()  # one family's transformer at a time
            print("\n".join(lines), f"\n  ({time.process_time() - start:.0f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
