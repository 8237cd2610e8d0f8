"""The recipe: one typed tree of dataclasses, loaded from YAML with dotted command-line overrides.

This module only assembles the tree, loads, overrides and validates it: each section's dataclass lives beside
the code that consumes it (the model, the flow math, the encoders, the data, the engine, the loop, sampling,
logging, eval), and each component receives its own section. Precedence: command line > recipe file (and the
files it names as `base`) > defaults. The model section starts from its named preset (`model.preset`), so a
recipe only writes what differs from that preset. Every error is a `RecipeError` whose message names the key,
what is allowed and the nearest valid spelling. The defaults are neutral (an SD3-medium-sized text-to-image job);
the CPU digits job is recipes/digits.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from flowmatch.data.config import DataConfig
from flowmatch.encoders.autoencoder import AutoencoderConfig
from flowmatch.encoders.diffusers_folder import MODEL_INDEX
from flowmatch.encoders.text import TextEncoderConfig
from flowmatch.encoders.text_set import TextEncodersConfig
from flowmatch.engine import DistributedConfig, OptimConfig
from flowmatch.errors import RecipeError, nearest
from flowmatch.eval_config import EvalConfig
from flowmatch.families import check_references, family_of
from flowmatch.families.config import ModelConfig
from flowmatch.families.presets import preset_values
from flowmatch.flow.timesteps import FlowConfig
from flowmatch.init_from import stated_architecture
from flowmatch.monitor import LoggingConfig
from flowmatch.sampling.generate import SamplingConfig
from flowmatch.training.config import TrainConfig

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "recipe_from_yaml", "to_yaml"]

DEFAULT_PRESET = "sd3-medium"
#: `name_or_path: from_init` (text encoders, autoencoder): the component of model.init_from's pipeline.
FROM_INIT = "from_init"


@dataclass
class Recipe:
    """A whole training job."""

    run_dir: str = "runs/default"
    """Where checkpoints, samples, logs and the resolved recipe go; training again with it resumes."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**preset_values(DEFAULT_PRESET)))
    """The MMDiT (flowmatch.families.config.ModelConfig); start from a preset with model.preset, or from weights
    with model.init_from."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """Rectified flow: time distribution, shift, loss weighting, caption dropout."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Frozen text encoder (the only one unless text_encoders names several)."""
    text_encoders: TextEncodersConfig = field(default_factory=TextEncodersConfig)
    """Several frozen text encoders, each with its own settings, combined as SD3 or FLUX combine them."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """Frozen autoencoder (identity = pixel space)."""
    data: DataConfig = field(default_factory=DataConfig)
    """WebDataset shards and loading."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """DeepSpeed: ZeRO stage, precision, offload."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling defaults and validation grids."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress bar and TensorBoard."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What flowmatch eval measures."""

    @property
    def text(self) -> TextEncodersConfig:
        """The run's text encoders: text_encoders, or the text_encoder section alone when that names none."""
        return self.text_encoders.resolved(self.text_encoder)


# ----------------------------------------------------------------------------------------------- loading


def load_recipe(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a recipe file (None = the defaults) and apply `section.key=value` overrides."""
    tree: dict[str, Any] = read_yaml_tree(Path(path)) if path else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form section.key=value (e.g. train.max_steps=100)")
        set_dotted(tree, key.strip(), parse_override(key.strip(), raw))
    return recipe_from_dict(tree)


def parse_override(key: str, raw: str) -> Any:
    """The value of a `key=raw` override, read as YAML (`null` clears an optional key); a RecipeError names it."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        what = str(err).splitlines()[0]
        raise RecipeError(f"override {key}={raw!r} is not a YAML value ({what}): write a plain number, word, "
                          "true/false, null or [list]; quote text that holds YAML syntax, and note that tags "
                          "such as !!python/object are never accepted") from None


def recipe_from_yaml(text: str, stored_in: str = "a run, checkpoint or export folder") -> Recipe:
    """A recipe read back from where a run stored it (`stored_in` names the place in messages): its shards may not
    run commands unless the user trusts run directories (flowmatch.data.trust)."""
    recipe = recipe_from_dict(yaml.safe_load(text) or {})
    recipe.data.stored_in = stored_in
    return recipe


def read_yaml_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file, merging the file named by its `base:` key (relative to it) underneath; `chain` holds the
    files that led here, so a `base:` cycle is an error naming it."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved):], resolved))
        raise RecipeError(f"recipe files name each other as base in a cycle: {cycle}; remove one of the base: keys")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (try recipes/digits.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of sections, not {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"recipe file {str(path)!r}: base: {base!r} must name another recipe file (a path "
                          "relative to this one, e.g. base: digits.yaml); remove the key for none")
    return merge(read_yaml_tree(path.parent / base, (*chain, resolved)), tree)


def merge(low: dict, high: dict) -> dict:
    """Deep merge: keys of `high` win, nested mappings merge."""
    out = dict(low)
    for key, value in high.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree["a"]["b"] = value for key "a.b"."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {key!r}: {part!r} is a value, not a section")
    node[last] = value


def recipe_from_dict(tree: dict[str, Any]) -> Recipe:
    """Build and validate the Recipe; the model section starts from its preset's values."""
    tree = dict(tree)
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise RecipeError("model: expected a mapping of model settings")
    if "preset" in model and model["preset"] is None:  # `model.preset=null`: no preset stated (init_from says)
        model = {k: v for k, v in model.items() if k != "preset"}
    preset = model.get("preset", DEFAULT_PRESET)
    try:
        tree["model"] = merge({**preset_values(preset), "preset": preset}, model)  # nested sections (unet) merge
    except ValueError as err:
        raise RecipeError(f"model.preset: {err}") from None
    recipe = build_dataclass(Recipe, tree, "")
    check_paired(recipe)
    check_text(recipe, stated="preset" in model or "family" in model)
    resolve_from_init(recipe, stated_preset="preset" in (tree.get("autoencoder") or {}))
    if recipe.model.init_from:
        # Checked against the weights' architecture when the run is assembled (flowmatch.init_from).
        recipe.model.stated = stated_architecture(model)
    return recipe


def check_paired(recipe: Recipe) -> None:
    """Paired (editing) data goes with a family that takes reference images, and such a family with paired data:
    a RecipeError naming data.paired and model.family otherwise."""
    family = family_of(recipe.model)
    if recipe.data.paired:
        try:
            check_references(family, 1, "data.paired: true (samples carry reference images)")
        except ValueError as err:
            raise RecipeError(f"{err} (model.family)") from None
    elif family.capabilities.references:
        raise RecipeError(f"model.family: {family.name} is an editing family (it takes up to "
                          f"{family.capabilities.references} reference image(s) per sample) but data.paired is "
                          "false: train it on paired shards (data.paired: true; samples with ref.EXT members, "
                          "written by flowmatch-data folder|jsonl from a reference field) or use a text-to-image "
                          "family")


def check_text(recipe: Recipe, *, stated: bool) -> None:
    """The text encoders give what the model reads: a RecipeError naming model.family and the encoder otherwise.
    A model without a pooled input (modulation from the timestep alone) takes no CLIP encoder, whose only share
    is a pooled vector; a model with a pooled input needs an encoder that pools (any kind: the pooled width is
    checked against the model's when the encoders are built). ``stated``: the recipe states its preset."""
    family = family_of(recipe.model)
    kinds = {name: c.kind for name, c in recipe.text.encoders.items()}
    listed = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    clips = [name for name, kind in kinds.items() if kind == "clip"]
    if not recipe.model.takes_pooled and clips:
        raise RecipeError(f"model.family: {family.name} takes no pooled text vector, but text encoder {clips[0]} "
                          f"(kind clip) is there for one (text encoders: {listed}): condition it on one t5 "
                          "encoder (text_encoders.combine: single) or use a family with a pooled input")
    pooling = [c.pooling for c in recipe.text.encoders.values()]
    if recipe.model.takes_pooled and pooling and all(p == "none" for p in pooling):
        raise RecipeError(f"model.family: {family.name} reads a pooled text vector, but no text encoder pools "
                          f"(text encoders: {listed}, each pooling: none): add an encoder that pools (its "
                          f"pipeline's CLIP, text_encoders.combine: {family.text.name if family.text else 'single'})"
                          " or use a family without a pooled input")


def resolve_from_init(recipe: Recipe, *, stated_preset: bool) -> None:
    """Point every `name_or_path: from_init` at model.init_from's pipeline (its folder, or the hub id); a VAE taken
    so uses that folder's latent factors (`preset: config`) unless the recipe states a preset."""
    sections = {"autoencoder": recipe.autoencoder, "text_encoder": recipe.text_encoder,
                **{f"text_encoders.encoders.{n}": c for n, c in recipe.text_encoders.encoders.items()}}
    named = {key: cfg for key, cfg in sections.items() if cfg.name_or_path == FROM_INIT}
    if not named:
        return
    key, source = f"{next(iter(named))}.name_or_path", recipe.model.init_from
    if not source:
        raise RecipeError(f"{key}: {FROM_INIT} takes that component from model.init_from's pipeline, but "
                          "model.init_from is not set: set it to a diffusers pipeline folder or hub id, or give "
                          f"{key} a folder or hub id of its own")
    path = Path(source).expanduser()
    root = next((str(d) for d in (path, path.parent) if (d / MODEL_INDEX).is_file()), None)
    if root is None and path.exists():
        raise RecipeError(f"{key}: {FROM_INIT} needs model.init_from to be a diffusers pipeline folder (holding "
                          f"{MODEL_INDEX}), but {source!r} is not one: give {key} the folder of that component")
    for cfg in named.values():
        cfg.name_or_path = root or source  # a hub id: the pipeline's repository
    if "autoencoder" in named and not stated_preset:
        recipe.autoencoder.preset = "config"


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = nearest(key, fields)
            hint = f" Did you mean {(where + '.' if where else '') + near!r}?" if near else ""
            raise RecipeError(f"unknown recipe key {path!r}.{hint} Allowed here: {', '.join(sorted(fields))}.")
        kwargs[key] = convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where or 'recipe'}: {err}") from None


def convert(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against the type hint (int, float, str, bool, Optional, list, tuple, dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, path)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping of names to settings, got {value!r}")
        return {str(k): build_dataclass(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is dict or hint is Any:
        return value
    if value is None and hint in (bool, int, float, str):
        raise RecipeError(f"{path}: cannot be null (it is not an optional key); give a value or leave the key out "
                          "for its default")
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        return finite_float(value, path)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def finite_float(value: Any, path: str) -> float:
    """A float key's value: a number, or text in scientific notation (YAML 1.1 reads `1e-4` as a string)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise RecipeError(f"{path}: expected a number (e.g. 0.0001 or 1e-4), got {value!r}")
    if math.isnan(number):
        raise RecipeError(f"{path}: got {value!r}, not a number; give a finite value (e.g. 0.0001 or 1e-4)")
    return float(number)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(recipe))


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; loading it back gives an equal Recipe."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
