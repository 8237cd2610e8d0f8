"""`model.init_from`: starting a run from existing weights, and the record of where they came from.

A source is one of

    checkpoint   a flowmatch run directory (its newest intact checkpoint) or one checkpoint directory: its
                 default weights (EMA or raw, as validation chose), verified against its manifest
    diffusers    a diffusers transformer folder, a pipeline folder (its transformer/), or a hub id of either
    original     an original single-file .safetensors (SD3/SD3.5 joint_blocks.*, FLUX double_blocks.*)

The architecture comes from the weights (config.json, the safetensors header, or the run's recipe), so the recipe
need not repeat it; a preset or model keys it does state must agree, or a RecipeError names both. The run starts
at step 0 with a fresh optimizer; every checkpoint's meta.json records the source as an :class:`InitRecord`
(where, which kind, and the SHA-256 of the weights' bytes). LoRA checkpoints hold only adapters, so their base is
found again through that record, and the hash proves it is the same base.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from flowmatch.checkpoint import resolve_checkpoint, weights_file
from flowmatch.checkpoint.layout import CHECKPOINTS_DIR, EMA_FILE, MODEL_FILE, names_a_checkpoint
from flowmatch.checkpoint.manifest import read_manifest, sha256_file, structure_problem
from flowmatch.errors import RecipeError
from flowmatch.families import family_of, get_family
from flowmatch.families.config import ARCHITECTURE_FIELDS, ModelConfig
from flowmatch.families.convert import convert_diffusers, convert_original, diffusers_folder
from flowmatch.families.presets import preset_values
from flowmatch.models.embeddings import TimestepEmbedder
from flowmatch.models.mmdit import EMBEDDER_INIT_STD, MMDiTConfig

__all__ = ["KINDS", "NEW_EMBEDDERS", "InitRecord", "cast", "from_meta", "load_weights", "locate", "record",
           "stated_architecture", "with_architecture", "with_new_embedders"]

KINDS = ("checkpoint", "diffusers", "original")
#: Inputs a recipe may add to weights that lack them (few-step training from a flow model: the interval, guidance as
#: an input). Their embedders start with a zeroed last layer, so the model first computes what the weights did.
NEW_EMBEDDERS = ("interval_embed", "guidance_embed")
#: Files of a hub repository that hold a diffusers transformer (a transformer repository, or a pipeline's).
HUB_PATTERNS = ["config.json", "diffusion_pytorch_model*", "transformer/config.json",
                "transformer/diffusion_pytorch_model*"]


@dataclass
class InitRecord:
    """Where a run's starting weights came from (meta.json's `init_from`)."""

    source: str
    """model.init_from as the recipe gave it."""
    kind: str
    """checkpoint | diffusers | original."""
    path: str
    """What was read: the checkpoint directory, the transformer folder, or the file (absolute)."""
    sha256: str
    """SHA-256 of the weights' bytes (of the one file; of the sorted 'name digest' lines for several files)."""
    weights: Optional[str] = None
    """The checkpoint's weights file read (model.safetensors or ema.safetensors); None for other kinds."""


# ------------------------------------------------------------------------------------------------ locating


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))


def locate(source: str) -> tuple[str, Path]:
    """(kind, local path) of an init_from value; a hub id is downloaded (or taken from the cache) first. The
    architecture of what it holds: :func:`flowmatch.run.source_architecture`."""
    p = Path(source)
    if p.is_file():
        return "original", _intact(source, p.resolve())
    if p.is_dir():
        if names_a_checkpoint(p) or (p / CHECKPOINTS_DIR).is_dir():  # its weights hashed and checked too
            return "checkpoint", resolve_checkpoint(p, reads=lambda _: (MODEL_FILE, EMA_FILE)).resolve()
        folder = diffusers_folder(p)
        if folder is None:
            raise RecipeError(f"model.init_from={source!r} is a folder with neither config.json (a diffusers "
                              "transformer folder), transformer/config.json (a pipeline folder) nor checkpoints/ "
                              "(a flowmatch run)")
        return "diffusers", _intact(source, folder.resolve())
    if source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            hub = _hub_folder(source)
        except Exception as err:  # offline, no such repository, no access: all end in the same advice
            raise RecipeError(f"model.init_from={source!r} is no path under {Path.cwd()} and the hub could not give "
                              f"it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): for a run "
                              "directory, train that run first or give its path; for a hub id, check the name and "
                              "the connection (or download it and give the folder)") from err
        folder = diffusers_folder(hub)
        if folder is not None:
            return "diffusers", folder
    raise RecipeError(f"model.init_from={source!r} does not exist: give a diffusers pipeline or transformer folder, "
                      "a hub id (org/name), an original .safetensors file, or a flowmatch run directory")


def _intact(source: str, path: Path) -> Path:
    """`path` once the safetensors files it is or holds have headers that agree with their lengths; a RecipeError
    names the damaged file."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        problem = structure_problem(f) if f.suffix == ".safetensors" else None
        if problem:
            raise RecipeError(f"model.init_from={source!r}: {f} is damaged ({problem}); download or copy the "
                              "weights again, or start from other weights")
    return path


# ------------------------------------------------------------------------------------------------- the recipe


def stated_architecture(section: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """What a recipe's model mapping says about the architecture: field -> (value, where it says so)."""
    stated: dict[str, tuple[Any, str]] = {}
    if "preset" in section:
        name = section["preset"]
        stated.update({k: (v, f"model.preset={name}") for k, v in preset_values(name).items()
                       if k in ARCHITECTURE_FIELDS})
    stated.update({k: (section[k], f"model.{k}") for k in ARCHITECTURE_FIELDS if k in section})
    return stated


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def with_architecture(model: ModelConfig, weights: MMDiTConfig) -> ModelConfig:
    """`model` with the architecture of `weights`; RecipeError when the recipe stated (preset or keys, recorded by
    :func:`flowmatch.config.recipe_from_dict`) something else. None values (sizes left to the encoders) and
    configs built in code, which state nothing, always agree."""
    stated: dict[str, tuple[Any, str]] = getattr(model, "stated", {})
    if model.references and not weights.references:
        # Weights whose format does not say whether they take reference images (a FLUX.1 single file or bare
        # transformer folder is FLUX.1 Kontext's layout too, and FLUX.1-dev can be trained into an editing model)
        # take the recipe's model.references.
        weights = dataclasses.replace(weights, references=model.references)
    theirs = family_of(weights)
    if model.family is not None and get_family(model.family) is not theirs:
        raise RecipeError(f"model.family: {model.family}, but model.init_from={model.init_from!r} holds "
                          f"{theirs.name} weights ({weights.preset} layout): a {theirs.name} checkpoint does not load "
                          f"as a {model.family} model; set model.family: {theirs.name} (or remove it: the family "
                          f"comes from the weights) or start from {model.family} weights")
    added = {k for k in NEW_EMBEDDERS if getattr(model, k) and not getattr(weights, k)}
    for key, (value, where) in stated.items():
        if key in added:
            continue  # an input the weights lack: its embedder starts at zero (with_new_embedders)
        if value is not None and not _same(value, getattr(weights, key)):
            said = f"{where} gives {key}={value!r}" if "preset" in where else f"{where}={value!r}"
            raise RecipeError(f"{said}, but model.init_from={model.init_from!r} holds weights with "
                              f"{key}={getattr(weights, key)!r} ({weights.preset} layout, {theirs.name} family): "
                              f"remove {where.split('=')[0]} from the recipe (the architecture comes from the weights) "
                              "or start from other weights")
    preset = model.preset if "preset" in stated else weights.preset
    return dataclasses.replace(model, preset=preset,
                               **{k: k in added or getattr(weights, k) for k in ARCHITECTURE_FIELDS})


def with_new_embedders(state: Mapping[str, Tensor], cfg: MMDiTConfig, seed: int) -> dict[str, Tensor]:
    """``state`` completed with the :data:`NEW_EMBEDDERS` that ``cfg`` has and the weights lack, initialised as
    :meth:`MMDiT.init_weights` does (N(0, 0.02) weights, zero biases) but with the last layer zeroed: their output
    is 0, so the model computes what the weights did until training moves them. Seeded by ``seed``."""
    missing = [n for n in NEW_EMBEDDERS if getattr(cfg, n) and not any(k.startswith(n + ".") for k in state)]
    out = dict(state)
    if not missing:
        return out
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    for name in missing:
        embedder = TimestepEmbedder(cfg.time_freq_dim, cfg.num_heads * cfg.head_dim)
        with torch.no_grad():
            fc1, fc2 = embedder.mlp.fc1, embedder.mlp.fc2
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=generator) * EMBEDDER_INIT_STD)
            for p in (fc1.bias, fc2.weight, fc2.bias):
                nn.init.zeros_(p)
        out.update({f"{name}.{k}": v.to(dtype) for k, v in embedder.state_dict().items()})
    return out


# ------------------------------------------------------------------------------------------------- the weights


def _sha256(files: list[Path]) -> str:
    digests = [sha256_file(f) for f in files]
    if len(files) == 1:
        return digests[0]
    lines = "".join(f"{f.name} {d}\n" for f, d in zip(files, digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def record(source: str, kind: str, path: Path) -> InitRecord:
    """The :class:`InitRecord` of a located source: hashes its weights (a checkpoint's hash is its manifest's,
    verified on reading)."""
    if kind == "checkpoint":
        name = weights_file(path, None)
        resolve_checkpoint(path, reads=lambda c: (name,))
        return InitRecord(source, kind, str(path), read_manifest(path)[name]["sha256"], name)
    files = [path] if kind == "original" else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights (flowmatch reads no pickled weights)")
    return InitRecord(source, kind, str(path), _sha256(files))


def load_weights(rec: InitRecord, *, verify: bool = False) -> dict[str, Tensor]:
    """Our state dict of the recorded weights; with `verify`, first check their hash still is the record's."""
    path = Path(rec.path)
    if verify:
        now = record(rec.source, rec.kind, path)
        if now.sha256 != rec.sha256 or now.weights != rec.weights:
            raise ValueError(f"the base weights at {path} changed since training (SHA-256 {now.sha256[:12]}..., "
                             f"recorded {rec.sha256[:12]}...): restore them, or retrain the adapters on these")
    if rec.kind == "checkpoint":
        return load_file(str(path / rec.weights))
    convert = convert_diffusers if rec.kind == "diffusers" else convert_original
    return convert(path).state_dict


def from_meta(meta_init: Optional[Mapping[str, Any]]) -> Optional[InitRecord]:
    """The InitRecord of a checkpoint's meta.json entry (None when the run started from a random init)."""
    return None if meta_init is None else InitRecord(**meta_init)


def cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors in `dtype` (the run's working precision), others as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
