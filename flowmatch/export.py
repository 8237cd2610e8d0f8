"""`flowmatch export`: a run's transformer for the diffusers ecosystem.

    OUT_DIR/transformer/                 --format diffusers: config.json + safetensors, loadable by
                                         SD3Transformer2DModel / FluxTransformer2DModel.from_pretrained
    OUT_DIR/transformer.safetensors      --format original: SD3's joint_blocks.* (model.diffusion_model. prefix)
                                         or BFL FLUX keys, as ComfyUI and the releases' single files hold them
    OUT_DIR/scheduler/scheduler_config.json   FlowMatchEulerDiscreteScheduler settings with the run's shift (when
                                         diffusers has one for every size; see flowmatch.sampling.diffusers_schedule)
    OUT_DIR/pytorch_lora_weights.safetensors  --lora, a LoRA run's adapters in diffusers' peft keys with the
                                         lora_adapter_metadata header (flowmatch.models.convert.lora); --merge
                                         writes the transformer with them merged into the base weights instead
    OUT_DIR/lora_comfyui.safetensors     --lora --format comfyui: diffusion_model.<release module> keys, fused q/k/v
    OUT_DIR/lora_kohya.safetensors       --lora --format kohya: lora_unet_* keys with alpha tensors, fused q/k/v
                                         (each family's formats: flowmatch/families/<family>/lora_formats.py)
    OUT_DIR/model_index.json, text_encoder*/, tokenizer*/, vae/
                                         --format diffusers, when the run's encoders are a diffusers pipeline's
                                         components (flowmatch.pipeline_folder): a complete pipeline folder,
                                         loadable by DiffusionPipeline.from_pretrained(OUT_DIR)

The weights are the checkpoint's consolidated fp32 safetensors (EMA or raw), which every run writes whatever its
ZeRO stage, so a ZeRO-3 run exports on one CPU process without gathering partitions; `dtype` casts them (the
releases are bf16). The tensors that need no transformation are written from the loaded checkpoint without a
second copy.

A complete pipeline folder needs the text encoders and the VAE of a diffusers pipeline (CLIP / T5 / AutoencoderKL
combined as SD3 or FLUX combine them, read from that pipeline's folder); a flowmatch run's single text encoder
(MiniLM for the digits, or one T5) is not such a pipeline's, so only the transformer (and the scheduler) are
written, and the summary says so.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flowmatch.checkpoint import load_weights
from flowmatch.dtypes import DTYPES
from flowmatch.engine.state import write_safetensors
from flowmatch.errors import choice_error
from flowmatch.families import Family, family_of
from flowmatch.families.convert import save_original, to_diffusers
from flowmatch.families.lora import lora_formats, select
from flowmatch.flow import TimeSchedule
from flowmatch.models.convert.adapters import ExportError, loader_of, merge_adapters, to_adapter_file
from flowmatch.models.convert.lora import LORA_FILE
from flowmatch.models.mmdit import MMDiTConfig
from flowmatch.pipeline_folder import pipeline_source, write_pipeline_components
from flowmatch.run import lora_base, open_run, read_meta
from flowmatch.sampling.diffusers_schedule import scheduler_config

WEIGHTS = ("ema", "raw")
FORMATS = ("diffusers", "original")
TRANSFORMER_DIR = "transformer"
ORIGINAL_FILE = "transformer.safetensors"
SCHEDULER_DIR = "scheduler"
#: What a whole-transformer export may write into OUT_DIR besides the transformer: the scheduler, and the rest of a
#: pipeline folder when the run's encoders are a pipeline's (flowmatch.pipeline_folder.write_pipeline_components).
PIPELINE_PARTS = (SCHEDULER_DIR, "model_index.json", "vae",
                  *(f"{name}{n}" for name in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")))


@dataclass
class ExportSummary:
    """What :func:`export` wrote."""

    out_dir: Path
    """The output directory."""
    checkpoint: Path
    """The checkpoint the weights came from."""
    weights: str
    """ema | raw."""
    dtype: str
    """fp32 | bf16 | fp16."""
    format: str
    """diffusers | original | lora (diffusers' keys) | lora-comfyui | lora-kohya ..."""
    architecture: str
    """The diffusers class the transformer belongs to (SD3Transformer2DModel or FluxTransformer2DModel)."""
    files: list[Path]
    """Every file written."""
    notes: list[str]
    """What was not written, and why."""

    @property
    def bytes(self) -> int:
        """Total size of the files written."""
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> str:
        """A few lines for the command line."""
        lines = [f"exported {self.checkpoint} ({self.weights} weights, {self.dtype}) to {self.out_dir}: "
                 f"{self.architecture}, {self.format} layout, {len(self.files)} files, {self.bytes / 2**20:.1f} MiB"]
        lines += [f"  {f.relative_to(self.out_dir)}" for f in self.files]
        return "\n".join(lines + self.notes)


def _sizes_from_weights(cfg: MMDiTConfig, state: dict) -> MMDiTConfig:
    """The input sizes a recipe leaves to the encoders (None), read from the weights' shapes instead, so that
    exporting never loads an encoder."""
    p = cfg.patch_size
    found = dict(in_channels=state["patch_embed.weight"].shape[1] // (p * p),
                 context_dim=state["context_embed.weight"].shape[1],
                 # A model without a pooled vector (Qwen-Image) has no pooled embedder.
                 pooled_dim=state["pooled_embed.fc1.weight"].shape[1] if "pooled_embed.fc1.weight" in state else 0)
    return dataclasses.replace(cfg, **{k: v for k, v in found.items() if getattr(cfg, k) is None})


def _transformer_only_note(why: str) -> str:
    return (f"transformer only, no pipeline folder: {why}; generate with flowmatch, or pair the transformer with "
            "encoders that produce the same conditioning")


def _write_rest(schedule: TimeSchedule, out_dir: Path, recipe, arch_class: str,
                fmt: str, replace: list[Path], family: Family) -> tuple[list[Path], list[str]]:
    """The scheduler, and the rest of the pipeline folder when the run's encoders are a pipeline's (the `replace`
    parts removed first), as the `family`'s pipeline that runs the run's transformer with those encoders
    (:meth:`Family.export_pipeline`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # optional heavy dependency, loaded on use

    try:
        config = scheduler_config(schedule)
    except ValueError as err:
        why = f"no scheduler: {err} (flowmatch.sampling.diffusers_schedule.mu_for gives mu per size)"
        return [], [why, _transformer_only_note("the run's shift has no diffusers scheduler")]
    notes = ["scheduler: pass sigmas=flowmatch.sampling.diffusers_schedule.diffusers_sigmas(steps) to walk "
             "flowmatch's grid exactly" + ("" if config["use_dynamic_shifting"] else
                                           " (the pipelines' default sigmas differ for a static shift)")]
    source, why = pipeline_source(recipe, arch_class)
    pipeline = None if source is None else family.export_pipeline(recipe.model.guidance_embed, source.pipeline_class)
    if source is not None and pipeline is None:
        embeds = "with" if recipe.model.guidance_embed else "without"
        source, why = None, (f"the run's encoders are a {source.pipeline_class}'s, which does not run its transformer "
                             f"({embeds} a guidance embedding)")
    if source is not None and fmt == "diffusers":
        _remove(replace)
        pipeline_class = pipeline.pipeline_class
        files = write_pipeline_components(source, out_dir, arch_class, config, pipeline_class)
        return files, notes + [f"complete {pipeline_class} folder (encoders, tokenizers and VAE copied from "
                               f"{source.path}): DiffusionPipeline.from_pretrained({str(out_dir)!r})"]
    _remove([p for p in replace if p.name == SCHEDULER_DIR])
    FlowMatchEulerDiscreteScheduler(**config).save_config(out_dir / SCHEDULER_DIR)
    if source is not None:
        why = "--format original writes single-file transformer keys"
    return [out_dir / SCHEDULER_DIR / "scheduler_config.json"], notes + [_transformer_only_note(why)]


def export(path: str | os.PathLike, out_dir: str | os.PathLike, *, weights: Optional[str] = None,
           fmt: str = "diffusers", dtype: str = "fp32", lora: bool = False, merge: bool = False,
           overwrite: bool = False) -> ExportSummary:
    """Write the transformer of a run directory (its newest checkpoint) or of one checkpoint to `out_dir`.

    Args:
        path: ``RUN_DIR`` or ``RUN_DIR/checkpoints/<step>``.
        out_dir: created if missing; an existing output part in it (transformer, scheduler, pipeline
            component) is an error unless `overwrite`.
        weights: ``ema`` or ``raw``; None = EMA when the checkpoint has it.
        fmt: ``diffusers`` (a transformer folder) or ``original`` (one safetensors file of original keys); with
            `lora`, one of the family's LoRA formats: ``diffusers``, ``comfyui``, ``kohya``.
        dtype: ``fp32`` (the checkpoint's), ``bf16`` or ``fp16``.
        lora: a LoRA run's adapters in the LoRA format `fmt`: ``OUT_DIR/pytorch_lora_weights.safetensors`` for
            diffusers' ``load_lora_weights``, ``OUT_DIR/lora_<fmt>.safetensors`` for the others.
        merge: a LoRA run's adapters merged into its base weights, written as a whole transformer in `fmt`.
        overwrite: replace the output parts that already exist in `out_dir` and this export writes (nothing
            else in it is touched).
    """
    if fmt not in FORMATS and not lora:
        raise choice_error("--format", fmt, FORMATS)
    if weights is not None and weights not in WEIGHTS:
        raise choice_error("--weights", weights, WEIGHTS)
    if dtype not in DTYPES:
        raise choice_error("--dtype", dtype, DTYPES)
    if lora and merge:
        raise ValueError("--lora writes the adapters, --merge the merged transformer: choose one")
    out = Path(out_dir)
    target = out / (lora_file(fmt) if lora else TRANSFORMER_DIR if fmt == "diffusers" else ORIGINAL_FILE)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export output {out} is a file, not a folder: give a folder path (it is created if "
                         "missing) or move the file away")
    existing = [out / name for name in (target.name, *([] if lora else PIPELINE_PARTS)) if (out / name).exists()]
    if existing and not overwrite:
        them = "it" if len(existing) == 1 else "them"
        raise ValueError(f"an export part already exists in {out}: {', '.join(p.name for p in existing)}; choose "
                         f"another output folder, or pass --overwrite to replace {them}")

    opened = open_run(path, weights=False)
    ckpt, recipe = opened.checkpoint, opened.recipe
    family = family_of(recipe.model)
    if family.converter is None:
        raise ValueError(f"flowmatch export writes MMDiT transformers; this run's model.kind is {recipe.model.kind!r} "
                         f"(model.family {family.name}: {family.summary}; its weights in model.safetensors are "
                         "flowmatch's only)")
    adapters = recipe.model.lora
    if adapters is None and (lora or merge):
        raise ValueError(f"{ckpt} is not a LoRA run (its recipe has no model.lora): export it without --lora/--merge")
    if adapters is not None and not (lora or merge):
        raise ValueError(f"{ckpt} is a LoRA run, its checkpoints hold adapters only: --lora writes them for "
                         "diffusers' load_lora_weights, --merge writes the transformer with them merged")
    weights = weights or ("ema" if read_meta(ckpt).ema else "raw")
    state = load_weights(ckpt, ema=weights == "ema")
    if lora:
        pipeline = family.export_pipeline(recipe.model.guidance_embed)
        pipeline_name = pipeline.pipeline_class if pipeline else "its diffusers pipeline"
        lora_format = _lora_format(family, fmt)
        try:
            tensors, metadata = to_adapter_file(state, select(recipe.model.architecture(), adapters.targets),
                                                adapters, lora_format, recipe.model.architecture())
        except ExportError as e:
            raise ValueError(f"{e} (flowmatch export RUN OUT --merge)") from None
        _remove(existing)
        out.mkdir(parents=True, exist_ok=True)
        files = [write_safetensors(target, {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                                   metadata)]
        how = loader_of(adapters.kind, pipeline_name) if fmt == "diffusers" else f"{lora_format.tool}"
        return ExportSummary(out_dir=out, checkpoint=ckpt, weights=weights, dtype=dtype,
                             format="lora" if fmt == "diffusers" else f"lora-{fmt}",
                             architecture=family.converter.DIFFUSERS_CLASS, files=files,
                             notes=[f"{adapters.kind} rank {adapters.rank}, alpha {adapters.alpha:g}, {fmt} keys: load "
                                    f"with {how} on the base weights {read_meta(ckpt).init_from['source']}; check it "
                                    f"with `flowmatch lora check {target} --base PIPELINE_DIR`"])
    if merge:
        state = _merged(ckpt, recipe.model, state)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    model = family.build(_sizes_from_weights(recipe.model.architecture(), state), device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    arch = family.converter

    out.mkdir(parents=True, exist_ok=True)
    _remove([p for p in existing if p == target])
    if fmt == "diffusers":
        to_diffusers(model, copy=False).save_pretrained(target, safe_serialization=True)
        files = sorted(f for f in target.iterdir() if f.is_file())
    else:
        files = [save_original(model, target)]
    scheduler_files, notes = _write_rest(TimeSchedule(recipe.flow), out, recipe, arch.DIFFUSERS_CLASS, fmt,
                                         [p for p in existing if p != target], family)
    return ExportSummary(out_dir=out, checkpoint=ckpt, weights=weights, dtype=dtype, format=fmt,
                         architecture=arch.DIFFUSERS_CLASS, files=files + scheduler_files, notes=notes)


def _remove(parts: list[Path]) -> None:
    """Delete the output parts an `overwrite` export replaces."""
    for part in parts:
        if part.is_dir() and not part.is_symlink():
            shutil.rmtree(part)
        else:
            part.unlink()


def lora_file(fmt: str) -> str:
    """The file name ``--lora --format fmt`` writes in OUT_DIR."""
    return LORA_FILE if fmt == "diffusers" else f"lora_{fmt}.safetensors"


def _lora_format(family, fmt: str):
    """The family's LoRA format ``fmt`` that export writes; ValueError naming the ones it has."""
    writable = {name: f for name, f in lora_formats(family).items() if f.writes}
    if fmt not in writable:
        raise choice_error(f"--format (LoRA formats of the {family.name} family)", fmt, writable)
    return writable[fmt]


def _merged(ckpt: Path, model_cfg, adapters: dict) -> dict:
    """The base weights a LoRA checkpoint records (their hash checked) with its adapters merged in."""
    base = lora_base(ckpt)
    chosen = select(model_cfg.architecture(), model_cfg.lora.targets)
    return merge_adapters({k: v.float() for k, v in base.items()}, adapters, chosen, model_cfg.lora)

