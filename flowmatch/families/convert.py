"""Weights both ways between flowmatch's MMDiT and the released layouts: diffusers' transformers
(`SD3Transformer2DModel`, `FluxTransformer2DModel`) and the original single-file keys of SD3/SD3.5
(`joint_blocks.*`) and FLUX.1 (`double_blocks.*`, `single_blocks.*`).

    model = from_diffusers("stabilityai/stable-diffusion-3.5-medium")   # hub id, pipeline or transformer folder
    theirs = to_diffusers(model)                                        # the matching diffusers class
    model = from_original("flux1-dev.safetensors")                      # or a state dict; no diffusers involved
    save_original(model, "out.safetensors")
    converted = convert_diffusers(path)      # config and our state dict before building (to size or shard first)

The family (:mod:`flowmatch.families`) is chosen by the diffusers class, by the original keys, or (going out) by
our config (:func:`flowmatch.families.family_of`). Configs travel with the weights, and a converted config that
equals a preset carries its name. Conversions there and back reproduce every tensor bit for bit; the few of theirs
that never reach an output (SD3's last-block text queries, its stored position table) are kept on the converted
model as `model.interop_inert` and written back from there (see :mod:`flowmatch.models.convert.keymap`).

Each family's key tables and config mappings live in its folder (``flowmatch/families/sd3/convert.py``,
``flowmatch/families/flux/convert.py``); the key-map machinery is :mod:`flowmatch.models.convert.keymap`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from flowmatch.families import FAMILIES, Family, family_of
from flowmatch.families.presets import config_from_preset, mmdit_presets
from flowmatch.families.spec import Converter
from flowmatch.models.convert.keymap import to_ours, to_theirs
from flowmatch.models.mmdit import MMDiT, MMDiTConfig

if TYPE_CHECKING:
    from diffusers import ModelMixin

__all__ = ["INERT_ATTR", "Converted", "architecture_of", "convert_diffusers", "convert_original", "diffusers_folder",
           "family_of_diffusers", "pipeline_class_of",
           "from_diffusers", "from_original", "load_diffusers", "load_original", "read_config", "save_original",
           "to_diffusers", "to_original"]

#: The families with a converter, by their diffusers transformer class; a class several families share
#: (FluxTransformer2DModel: FLUX.1 and FLUX.1 Kontext) is the first's unless the pipeline folder names another's
#: pipeline (:func:`family_of_diffusers`).
ARCHITECTURES: dict[str, Family] = {}
for _family in FAMILIES.values():
    if _family.converter:
        ARCHITECTURES.setdefault(_family.converter.DIFFUSERS_CLASS, _family)
#: The pipeline folder's index, naming its pipeline class.
MODEL_INDEX = "model_index.json"
#: Attribute of a converted model holding the source's inert tensors, per format ("diffusers", "original").
INERT_ATTR = "interop_inert"
#: Key prefixes of original single-file checkpoints (SD3 releases, ComfyUI saves), stripped on loading.
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: Safetensors metadata key under which `save_original` records our config.
CONFIG_METADATA = "flowmatch_config"


def architecture_of(cfg: MMDiTConfig) -> Converter:
    """The converter module of our config's family (``flowmatch/families/<family>/convert.py``); ValueError for a
    family without one."""
    family = family_of(cfg)
    if family.converter is None:
        raise ValueError(f"the {family.name} family ({family.summary}) has no diffusers or original-key converter")
    return family.converter


def _release_config(cfg: MMDiTConfig) -> tuple[Converter, dict[str, Any]]:
    """The architecture module and diffusers config of a model the released formats can hold; ValueError else."""
    if cfg.interval_embed:
        raise ValueError("this model takes a step input (model.interval_embed: a few-step MeanFlow or shortcut "
                         "model), which no diffusers or original SD3/FLUX transformer has, so it cannot be exported "
                         "to them: keep the flowmatch checkpoint and sample it with flowmatch's Pipeline "
                         "(sampling.solver: average)")
    arch = architecture_of(cfg)
    return arch, arch.diffusers_config(cfg)


def _named(cfg: MMDiTConfig) -> MMDiTConfig:
    """`cfg` with `preset` set to the preset of its family it equals field for field, if any."""
    values = dataclasses.asdict(cfg)
    for name in mmdit_presets(family_of(cfg)):
        candidate = dataclasses.asdict(config_from_preset(name))
        if all(candidate[k] == v for k, v in values.items() if k != "preset"):
            return dataclasses.replace(cfg, preset=name)
    return dataclasses.replace(cfg, preset="custom")


@dataclass
class Converted:
    """Released weights in flowmatch's layout, before a model is built (to size, shard or check them first)."""

    cfg: MMDiTConfig
    """The architecture, named after the preset it equals (else "custom")."""
    state_dict: dict[str, Tensor]
    """Our weights (`MMDiT.state_dict()` names and shapes)."""
    inert: dict[str, Tensor]
    """Their tensors that reach no output, by their name (written back by `to_diffusers` / `to_original`)."""
    fmt: str
    """Where they came from: diffusers | original."""

    def build(self) -> MMDiT:
        """The MMDiT holding these tensors (no copy)."""
        model = family_of(self.cfg).build(self.cfg, device="meta")
        model.load_state_dict(self.state_dict, strict=True, assign=True)
        setattr(model, INERT_ATTR, {self.fmt: self.inert})
        return model


def _inert(model: nn.Module, fmt: str) -> dict[str, Tensor]:
    return getattr(model, INERT_ATTR, {}).get(fmt, {})


# ----------------------------------------------------------------------------------------------- diffusers


def _diffusers_class(name: str):
    import diffusers

    if name not in ARCHITECTURES:
        raise ValueError(f"diffusers class {name!r} is not supported; flowmatch converts {sorted(ARCHITECTURES)}")
    return getattr(diffusers, name)


def family_of_diffusers(class_name: str, pipeline_class: Optional[str] = None) -> Family:
    """The family of a diffusers transformer class: the one whose pipeline is ``pipeline_class`` (the folder's
    model_index.json) among those converting that class, else the class's first (:data:`ARCHITECTURES`);
    ValueError naming the supported classes."""
    for family in FAMILIES.values():
        if (family.converter and family.converter.DIFFUSERS_CLASS == class_name
                and any(p.pipeline_class == pipeline_class for p in family.pipelines)):
            return family
    if class_name not in ARCHITECTURES:
        _diffusers_class(class_name)  # raises, naming the supported classes
    return ARCHITECTURES[class_name]


def pipeline_class_of(path_or_id: Union[str, os.PathLike]) -> Optional[str]:
    """The pipeline class a diffusers pipeline folder (or a cached hub id) names in model_index.json, also for
    its transformer/ subfolder; None for a transformer folder of its own, a single file or a hub id without one."""
    path = Path(path_or_id)
    if path.exists():
        for index in (path / MODEL_INDEX, path.parent / MODEL_INDEX):
            if index.is_file() and (index.parent == path or path.name in json.loads(index.read_text())):
                return json.loads(index.read_text()).get("_class_name")
        return None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(str(path_or_id), MODEL_INDEX)).read_text()).get("_class_name")
    except Exception:  # huggingface_hub raises several types for a missing repo, file or cache entry
        return None


def _hub_config(repo_id: str) -> tuple[str, Optional[str]]:
    """(path of the transformer's config.json, subfolder) of a hub repository: a transformer repository or a
    pipeline one (its transformer/); downloaded files are cached, and an offline cache is used as it is."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo_id, "config.json"), None
    except EntryNotFoundError:
        return hf_hub_download(repo_id, "transformer/config.json"), "transformer"


def diffusers_folder(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The transformer folder of a local diffusers transformer folder or pipeline folder, else None."""
    path = Path(path)
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    return None


def read_config(path: Union[str, os.PathLike]) -> MMDiTConfig:
    """Our config of the transformer in a local diffusers folder (transformer or pipeline) or an original single
    file, read from its config.json or its safetensors header, without loading any weight."""
    folder = diffusers_folder(path)
    if folder is not None:
        dcfg = json.loads((folder / "config.json").read_text())
        family = family_of_diffusers(dcfg.get("_class_name", ""), pipeline_class_of(path))
        return _named(family.converter.config_from_diffusers(dcfg))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(CONFIG_METADATA)
        if recorded:
            return _named(MMDiTConfig(**json.loads(recorded)))
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    sd = _strip_prefix(shapes)
    return _named(_original_family(sd).converter.config_from_original(sd))


def load_diffusers(path_or_id: Union[str, os.PathLike]) -> "ModelMixin":
    """The diffusers transformer saved at `path_or_id`: a transformer folder (config.json), a pipeline folder
    (transformer/config.json) or a hub id ("org/name", either kind); safetensors weights only."""
    path = Path(path_or_id)
    if path.is_dir():
        if (path / "config.json").is_file():
            config_file, subfolder = path / "config.json", None
        elif (path / "transformer" / "config.json").is_file():
            config_file, subfolder = path / "transformer" / "config.json", "transformer"
        else:
            raise FileNotFoundError(f"{path} holds neither config.json (a transformer folder) nor "
                                    "transformer/config.json (a pipeline folder)")
    elif path.exists() or str(path_or_id).count("/") > 1:
        raise FileNotFoundError(f"{path_or_id} is not a diffusers folder or a hub id (org/name)")
    else:
        config_file, subfolder = _hub_config(str(path_or_id))
    class_name = json.loads(Path(config_file).read_text()).get("_class_name", "")
    return _diffusers_class(class_name).from_pretrained(str(path_or_id), subfolder=subfolder, use_safetensors=True)


def from_diffusers(module_or_path: Union[nn.Module, str, os.PathLike], *, pipeline_class: Optional[str] = None,
                   ) -> MMDiT:
    """An MMDiT with the config and weights of a diffusers SD3/SD3.5, FLUX or FLUX Kontext transformer, given as
    a module or as anything :func:`load_diffusers` reads. A module's weights are copied; ValueError for variants
    flowmatch's MMDiT does not implement. The family is the transformer class's, told apart by the pipeline class
    where several share one (a FluxTransformer2DModel in a FluxKontextPipeline folder is Kontext's): read from
    the folder's model_index.json, or ``pipeline_class`` for a module."""
    return convert_diffusers(module_or_path, pipeline_class=pipeline_class).build()


def convert_diffusers(module_or_path: Union[nn.Module, str, os.PathLike], *, pipeline_class: Optional[str] = None,
                      ) -> Converted:
    """:func:`from_diffusers` without building the model."""
    if isinstance(module_or_path, nn.Module):
        module = module_or_path
        theirs = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        module = load_diffusers(module_or_path)
        theirs = {k: v.detach() for k, v in module.state_dict().items()}  # the module is dropped: no copy needed
        pipeline_class = pipeline_class or pipeline_class_of(module_or_path)
    family = family_of_diffusers(type(module).__name__, pipeline_class)
    arch = family.converter
    cfg = arch.config_from_diffusers(dict(module.config))
    ours, inert = to_ours(theirs, arch.diffusers_rules(cfg), what=f"this {arch.DIFFUSERS_CLASS}")
    return Converted(_named(cfg), ours, inert, "diffusers")


def to_diffusers(model: MMDiT, *, copy: bool = True) -> "ModelMixin":
    """The diffusers transformer (`SD3Transformer2DModel` or `FluxTransformer2DModel`) with `model`'s config and a
    copy of its weights, in their dtype and on their device. ValueError for options diffusers does not have.

    With ``copy=False`` the tensors that need no transformation are shared with `model` instead of copied, so a
    large model is not held twice (an export); the two then change together."""
    cfg = model.cfg
    arch, dcfg = _release_config(cfg)
    ours = {k: v.detach().clone() if copy else v.detach() for k, v in model.state_dict().items()}
    theirs = to_theirs(ours, arch.diffusers_rules(cfg), _inert(model, "diffusers"))
    # Built on the meta device and given the converted tensors: no random initialisation of a second model.
    with torch.device("meta"):
        module = _diffusers_class(arch.DIFFUSERS_CLASS)(**dcfg)
    module.load_state_dict(theirs, strict=True, assign=True)
    # tensors diffusers keeps outside the state dict (non-persistent buffers), where a family has them (Chroma)
    for name, value in getattr(arch, "diffusers_buffers", lambda _: {})(model).items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{arch.DIFFUSERS_CLASS} tensors not set by the conversion: {left[:6]}")
    return module.eval()


# ------------------------------------------------------------------------------------------------ original


def _strip_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's keys without their prefix; with a prefix, keys outside it (text encoders, VAE) are
    left out."""
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _original_family(sd: Mapping[str, Tensor]) -> Family:
    for family in ARCHITECTURES.values():
        if family.converter.is_original(sd):
            return family
    raise ValueError("not an original SD3 (joint_blocks.*) or FLUX (double_blocks.*) transformer state dict; "
                     f"first keys: {sorted(sd)[:6]}")


def load_original(path: Union[str, os.PathLike]) -> tuple[dict[str, Tensor], Optional[dict[str, Any]]]:
    """(state dict, our config fields or None) of an original single-file safetensors checkpoint; the config is
    there when :func:`save_original` wrote the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    recorded = metadata.get(CONFIG_METADATA)
    return load_file(str(path)), json.loads(recorded) if recorded else None


def from_original(state_dict_or_path: Union[Mapping[str, Tensor], str, os.PathLike], **overrides: Any) -> MMDiT:
    """An MMDiT from original SD3/SD3.5 or FLUX keys (with or without the `model.diffusion_model.` prefix),
    given as a state dict or a safetensors file, without diffusers.

    The config is read from the file when :func:`save_original` wrote it, else inferred from the weights;
    `overrides` (MMDiTConfig fields) set what the keys do not show: SD3's `sample_size` (128 assumed, checked
    against the stored position table) and `head_dim` without QK-norm (64 assumed), FLUX's `rope_axes_dim` for
    heads other than 128 channels. The returned weights share memory with the given tensors where no
    transformation is needed.
    """
    return convert_original(state_dict_or_path, **overrides).build()


def convert_original(state_dict_or_path: Union[Mapping[str, Tensor], str, os.PathLike], **overrides: Any,
                     ) -> Converted:
    """:func:`from_original` without building the model."""
    recorded = None
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path, recorded = load_original(state_dict_or_path)
    sd = _strip_prefix(state_dict_or_path)
    family = _original_family(sd)
    arch = family.converter
    cfg = MMDiTConfig(**recorded) if recorded else arch.config_from_original(sd, overrides.get("head_dim"))
    cfg = dataclasses.replace(cfg, **overrides)
    arch.check_original(cfg, sd)
    ours, inert = to_ours(sd, arch.original_rules(cfg), what=f"this original {family.name} state dict")
    return Converted(_named(cfg), ours, inert, "original")


def to_original(model: MMDiT, *, prefix: Optional[str] = None) -> dict[str, Tensor]:
    """`model`'s weights under the original keys of its architecture. `prefix` defaults to the releases' own:
    `model.diffusion_model.` for SD3, none for FLUX. Like `state_dict()`, tensors copied unchanged share memory
    with the model."""
    cfg = model.cfg
    arch, _ = _release_config(cfg)  # the same options as diffusers' classes: raises for those the releases lack
    theirs = to_theirs(model.state_dict(), arch.original_rules(cfg), _inert(model, "original"))
    prefix = arch.ORIGINAL_PREFIX if prefix is None else prefix
    return {prefix + k: v.contiguous() for k, v in theirs.items()}


def save_original(model: MMDiT, path: Union[str, os.PathLike], *, prefix: Optional[str] = None) -> Path:
    """Write :func:`to_original` to a safetensors file, with our config in its metadata; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(dataclasses.asdict(model.cfg))}
    save_file(to_original(model, prefix=prefix), str(path), metadata=metadata)
    return path
