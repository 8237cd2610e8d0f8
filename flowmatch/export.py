"""`flowmatch export`: a run's transformer for the diffusers ecosystem.

    OUT_DIR/transformer/                 --format diffusers: config.json + safetensors, loadable by
                                         SD3Transformer2DModel / FluxTransformer2DModel.from_pretrained
    OUT_DIR/transformer.safetensors      --format original: SD3's joint_blocks.* (model.diffusion_model. prefix)
                                         or BFL FLUX keys, as ComfyUI and the releases' single files hold them
    OUT_DIR/scheduler/scheduler_config.json   FlowMatchEulerDiscreteScheduler settings with the run's shift (when
                                         diffusers has one for every size; see flowmatch.sampling.diffusers_schedule)

The weights are the checkpoint's consolidated fp32 safetensors (EMA or raw), which every run writes whatever its
ZeRO stage, so a ZeRO-3 run exports on one CPU process without gathering partitions; `dtype` casts them (the
releases are bf16). The tensors that need no transformation are written from the loaded checkpoint without a
second copy.

A complete pipeline folder needs the text encoders and the VAE of a diffusers pipeline (CLIP / T5 / AutoencoderKL
combined as SD3 or FLUX combine them); a flowmatch run's single text encoder (MiniLM for the digits, or one T5) is
not such a pipeline's, so only the transformer (and the scheduler) are written, and the summary says so.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flowmatch.flow import TimeSchedule
from flowmatch.models.mmdit import MMDiT, MMDiTConfig

WEIGHTS = ("ema", "raw")
FORMATS = ("diffusers", "original")
TRANSFORMER_DIR = "transformer"
ORIGINAL_FILE = "transformer.safetensors"
SCHEDULER_DIR = "scheduler"


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
    """diffusers | original."""
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
                 pooled_dim=state["pooled_embed.fc1.weight"].shape[1])
    return dataclasses.replace(cfg, **{k: v for k, v in found.items() if getattr(cfg, k) is None})


def _pipeline_note(recipe) -> str:
    text, vae = recipe.text_encoder, recipe.autoencoder
    return (f"transformer only, no pipeline folder: the run's text encoder ({text.kind} {text.name_or_path}) and "
            f"autoencoder ({vae.kind}) are not the components of a diffusers SD3 or FLUX pipeline; generate with "
            "flowmatch, or pair the transformer with encoders that produce the same conditioning")


def _write_scheduler(schedule: TimeSchedule, out_dir: Path) -> tuple[list[Path], list[str]]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowmatch.sampling.diffusers_schedule import scheduler_config

    try:
        config = scheduler_config(schedule)
    except ValueError as err:
        return [], [f"no scheduler: {err} (flowmatch.sampling.diffusers_schedule.mu_for gives mu per size)"]
    FlowMatchEulerDiscreteScheduler(**config).save_config(out_dir / SCHEDULER_DIR)
    notes = ["scheduler: pass sigmas=flowmatch.sampling.diffusers_schedule.diffusers_sigmas(steps) to walk "
             "flowmatch's grid exactly" + ("" if config["use_dynamic_shifting"] else
                                           " (the pipelines' default sigmas differ for a static shift)")]
    return [out_dir / SCHEDULER_DIR / "scheduler_config.json"], notes


def export(path: str | os.PathLike, out_dir: str | os.PathLike, *, weights: Optional[str] = None,
           fmt: str = "diffusers", dtype: str = "fp32") -> ExportSummary:
    """Write the transformer of a run directory (its newest checkpoint) or of one checkpoint to `out_dir`.

    Args:
        path: ``RUN_DIR`` or ``RUN_DIR/checkpoints/<step>``.
        out_dir: created if missing; an existing export in it is an error.
        weights: ``ema`` or ``raw``; None = EMA when the checkpoint has it.
        fmt: ``diffusers`` (a transformer folder) or ``original`` (one safetensors file of original keys).
        dtype: ``fp32`` (the checkpoint's), ``bf16`` or ``fp16``.
    """
    from flowmatch.checkpoint import load_recipe_yaml, load_weights, read_meta, resolve_checkpoint
    from flowmatch.config import recipe_from_yaml
    from flowmatch.dtypes import DTYPES
    from flowmatch.errors import choice_error
    from flowmatch.models.convert import architecture_of, save_original, to_diffusers

    if fmt not in FORMATS:
        raise choice_error("--format", fmt, FORMATS)
    if weights is not None and weights not in WEIGHTS:
        raise choice_error("--weights", weights, WEIGHTS)
    if dtype not in DTYPES:
        raise choice_error("--dtype", dtype, DTYPES)
    out = Path(out_dir)
    target = out / (TRANSFORMER_DIR if fmt == "diffusers" else ORIGINAL_FILE)
    if target.exists():
        raise ValueError(f"{target} already exists: choose another output directory or remove it")

    ckpt = resolve_checkpoint(path)
    recipe = recipe_from_yaml(load_recipe_yaml(ckpt))
    if recipe.model.kind != "mmdit":
        raise ValueError(f"flowmatch export writes MMDiT transformers; this run's model.kind is {recipe.model.kind!r} "
                         "(its weights under 'unet.' in model.safetensors are diffusers' UNet2DConditionModel's)")
    weights = weights or ("ema" if read_meta(ckpt).ema else "raw")
    state = {k: v.to(DTYPES[dtype]) for k, v in load_weights(ckpt, ema=weights == "ema").items()}
    model = MMDiT(_sizes_from_weights(recipe.model, state), device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    arch = architecture_of(model.cfg)

    out.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        to_diffusers(model, copy=False).save_pretrained(target, safe_serialization=True)
        files = sorted(f for f in target.iterdir() if f.is_file())
    else:
        files = [save_original(model, target)]
    scheduler_files, notes = _write_scheduler(TimeSchedule(recipe.flow), out)
    return ExportSummary(out_dir=out, checkpoint=ckpt, weights=weights, dtype=dtype, format=fmt,
                         architecture=arch.DIFFUSERS_CLASS, files=files + scheduler_files,
                         notes=notes + [_pipeline_note(recipe)])
