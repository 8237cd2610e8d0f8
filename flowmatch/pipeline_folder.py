"""The rest of a diffusers pipeline folder beside an exported transformer: model_index.json, tokenizers, text
encoders and VAE, when a run's encoders are a diffusers pipeline's components.

A run's encoders are a pipeline's when its recipe's ``text_encoders`` and ``autoencoder`` sections are what
:func:`flowmatch.encoders.diffusers_folder.encoder_configs_from_pipeline` reads from one pipeline folder (as
after starting from that pipeline): the same folder, subfolders, lengths, hidden layers, pooling and VAE factors.
Their files are then copied unchanged from that folder (a hub id is read from the local cache), and
model_index.json names them, the exported transformer and the scheduler, so
``DiffusionPipeline.from_pretrained(OUT_DIR)`` builds the pipeline the run samples with. Any other encoders (the
digits MiniLM, a lone T5) have no diffusers pipeline: the caller writes the transformer alone and says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from flowmatch.encoders.autoencoder import LATENT_PRESETS
from flowmatch.encoders.diffusers_folder import (
    MODEL_INDEX,
    PipelineEncoderConfigs,
    encoder_configs_from_pipeline,
    read_pipeline_json,
)
from flowmatch.families import text_layout

#: The encoder settings that decide the conditioning; a run that changed one of them has no diffusers pipeline.
CONDITIONING_FIELDS = ("kind", "subfolder", "tokenizer_subfolder", "max_length", "padding", "hidden_layer",
                       "pooling", "normalize_pooled", "template", "drop_tokens", "stack_layers", "caption_remove")
#: Components the export writes itself.
OWN_COMPONENTS = ("transformer", "scheduler")


def pipeline_source(recipe, transformer_class: Optional[str] = None,
                    ) -> tuple[Optional[PipelineEncoderConfigs], str]:
    """(the pipeline whose components the run's encoders are, "") or (None, why they are not one's); with
    `transformer_class`, the pipeline's transformer must be of that diffusers class too."""
    text, vae = recipe.text, recipe.autoencoder
    if text_layout(text.combine).single and not _pipeline_folder(next(iter(text.encoders.values())).name_or_path):
        (only,) = text.encoders.values()  # one encoder of its own (MiniLM, a lone T5): no pipeline's
        return None, (f"the run's text encoder ({only.kind} {only.name_or_path}) is not the set of a diffusers "
                      "pipeline")
    folders = {c.name_or_path for c in text.encoders.values()} | {vae.name_or_path}
    if len(folders) != 1 or vae.kind != "vae":
        return None, f"the run's encoders and VAE come from several places ({', '.join(sorted(folders))})"
    (source,) = folders
    try:
        expected = encoder_configs_from_pipeline(source)
    except (FileNotFoundError, ValueError) as err:
        return None, f"the run's encoders' folder is not a readable diffusers pipeline: {err}"
    if list(text.encoders) != list(expected.text_encoders.encoders) or text.combine != expected.text_encoders.combine:
        return None, (f"the run combines {list(text.encoders)} as {text.combine}, {expected.pipeline_class} "
                      f"{list(expected.text_encoders.encoders)} as {expected.text_encoders.combine}")
    for name, cfg in text.encoders.items():
        for key in CONDITIONING_FIELDS:
            ours, theirs = getattr(cfg, key), getattr(expected.text_encoders.encoders[name], key)
            if ours != theirs:
                return None, (f"text_encoders.encoders.{name}.{key} is {ours!r} but {expected.pipeline_class} "
                              f"uses {theirs!r}")
    held = (read_pipeline_json(source, MODEL_INDEX).get("transformer") or [None, None])[1]
    if transformer_class is not None and held != transformer_class:
        return None, f"the run's transformer is a {transformer_class}, {expected.pipeline_class} holds a {held}"
    scale, shift = _factors(vae)
    want = (expected.autoencoder.scaling_factor, expected.autoencoder.shift_factor)
    if vae.subfolder != "vae" or (scale, shift) not in (want, (None, None)):
        return None, f"the run's VAE ({vae.subfolder}, scale {scale}, shift {shift}) is not the pipeline's {want}"
    return expected, ""


def _pipeline_folder(path: str) -> bool:
    """Whether `path` is a local folder holding a diffusers pipeline (its one encoder may then be the pipeline's,
    as Qwen-Image's Qwen2.5-VL is)."""
    return (Path(path) / MODEL_INDEX).is_file()


def _factors(vae) -> tuple[Optional[float], Optional[float]]:
    """The run's latent scale and shift (None, None: read from the VAE config, hence the pipeline's)."""
    if vae.preset == "config" and vae.scaling_factor is None and vae.shift_factor is None:
        return None, None
    preset_scale, preset_shift = LATENT_PRESETS[vae.preset]
    return (vae.scaling_factor if vae.scaling_factor is not None else preset_scale,
            vae.shift_factor if vae.shift_factor is not None else preset_shift)


def _component_folder(source: str, sub: str) -> Path:
    local = Path(source)
    if local.is_dir():
        return local / sub
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=[f"{sub}/*"])) / sub


def write_pipeline_components(source: PipelineEncoderConfigs, out: Path, transformer_class: str,
                              scheduler_config: dict, pipeline_class: Optional[str] = None) -> list[Path]:
    """Copy every component of `source` but the transformer and scheduler into `out`, write the scheduler with
    `scheduler_config` over the source's own settings, and model_index.json naming `transformer_class` and
    `pipeline_class` (the run's family's, e.g. FluxKontextPipeline for a Kontext model trained with a FluxPipeline's
    encoders; None: the source's) (check it with :func:`pipeline_source` first); returns the files written."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    index = read_pipeline_json(source.path, MODEL_INDEX)
    written: list[Path] = []
    for name, entry in index.items():
        if name.startswith("_") or name in OWN_COMPONENTS or not isinstance(entry, list) or entry[1] is None:
            continue
        target = out / name
        shutil.copytree(_component_folder(source.path, name), target)
        written += sorted(p for p in target.rglob("*") if p.is_file())
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**source.scheduler, **scheduler_config})
    scheduler.save_config(out / "scheduler")
    written.append(out / "scheduler" / "scheduler_config.json")
    index = {**index, "_class_name": pipeline_class or index["_class_name"],
             "transformer": ["diffusers", transformer_class],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return written + [out / MODEL_INDEX]
