"""What a model family is: the :class:`Family` spec each folder of :mod:`flowmatch.families` registers once.

A family bundles what is particular to one architecture line (torchtitan's per-model spec): its presets, how a
recipe's model section becomes the network, its converters and LoRA targets, its text conditioning and latent
layout, its time convention, its FLOP count, what the trainer may do with it, and how diffusers' pipeline of it
behaves. Everything else (trainer, sampler, exporter, ``init_from``, the encoders) asks the family and never
compares family names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from torch import Tensor, nn

from flowmatch.encoders.combine import TextLayout
from flowmatch.models.convert.keymap import Rule
from flowmatch.models.convert.lora_formats import LoraFormat


class Converter(Protocol):
    """A family's converter module (``flowmatch/families/<family>/convert.py``): its key tables and config mappings
    against diffusers' transformer class and the release's original single-file keys."""

    DIFFUSERS_CLASS: str
    """The diffusers transformer class, e.g. SD3Transformer2DModel."""
    ORIGINAL_PREFIX: str
    """The prefix the releases' single files put before the transformer's keys."""

    def is_original(self, keys) -> bool: ...
    def config_from_diffusers(self, dcfg: Mapping[str, Any]): ...
    def diffusers_config(self, cfg) -> dict[str, Any]: ...
    def diffusers_rules(self, cfg) -> list[Rule]: ...
    def original_rules(self, cfg) -> list[Rule]: ...
    def config_from_original(self, sd: Mapping[str, Tensor], head_dim: Optional[int] = None): ...
    def check_original(self, cfg, sd: Mapping[str, Tensor]) -> None: ...


@dataclass(frozen=True)
class Capabilities:
    """What the trainer may do with a family's model."""

    init_from: bool
    """It starts from released or converted weights (``model.init_from``)."""
    lora: bool
    """LoRA adapters can be trained on it (``model.lora``)."""
    interval_embed: bool
    """It can take the interval input r of the few-step objectives (``model.interval_embed``)."""
    block_transforms: bool
    """Activation checkpointing and ``torch.compile`` apply to its blocks (``train.activation_checkpointing``,
    ``train.compile``)."""
    references: int = 0
    """Reference images one sample may carry (image editing: ``Conditioning.reference``); 0 = none, a
    text-to-image family."""


@dataclass(frozen=True)
class LatentLayout:
    """How the family's released pipeline lays out latents before the transformer."""

    channels: Optional[int]
    """Latent channels of the released autoencoder (None: whatever the recipe's autoencoder gives)."""
    pack: int
    """Side of the latent patches diffusers' pipeline packs into token features itself (FLUX 2; 1 = none, the
    transformer patchifies). The per-channel scale and shift are the autoencoder's (``autoencoder`` section)."""
    patch_statistics: bool = False
    """The released VAE's latents are normalised per packed feature (channel, patch row, patch column) by
    statistics held in its weights (FLUX.2: AutoencoderKLFlux2's batch norm over 2x2 patches), not by its config's
    scale and shift; the autoencoder reads them itself (``autoencoder.preset: config``)."""


@dataclass(frozen=True)
class Schedule:
    """How diffusers' pipeline of a family walks ``FlowMatchEulerDiscreteScheduler``
    (:class:`flowmatch.sampling.diffusers_schedule.PipelineGrid`)."""

    max_shift: float
    """The max_shift the pipeline assumes when the scheduler config has none."""
    default_sigmas: bool
    """The pipeline passes ``sigmas = linspace(1, 1/N, N)`` itself when the caller gives none (FLUX)."""
    classifier_free: bool
    """Its guidance scale is classifier-free guidance (SD3), not a model input (FLUX)."""
    time_rounded: bool
    """The transformer receives ``sigma * 1000 / 1000`` in float32 and scales it again (FLUX)."""
    guidance_renorm: bool = False
    """Classifier-free guidance rescales each token's guided velocity to the conditional one's norm over its packed
    features (QwenImagePipeline's true CFG: ``comb * ||cond|| / ||comb||``)."""
    guidance_renorm_rows: bool = False
    """Classifier-free guidance rescales the guided velocity of each latent row (one channel, one row of (B, C, H,
    W) latents, across the width) to the conditional one's norm there (Lumina2Pipeline's cfg_normalization:
    ``torch.norm(dim=-1)`` of its unpacked latents)."""
    mu_from_channels: bool = False
    """A dynamic-shift scheduler's ``mu`` is computed from the latents' channel count where the image sequence
    length belongs (Lumina2Pipeline passes ``latents.shape[1]`` of its (B, C, H, W) latents as image_seq_len)."""
    mu: Optional[Callable[[int, int], float]] = None
    """``mu(image_seq_len, steps)``: the dynamic shift's mu the pipeline passes in place of the scheduler config's
    linear one (FLUX.2's compute_empirical_mu); None = the config's."""


@dataclass(frozen=True)
class DiffusersPipeline:
    """What flowmatch knows of a family's diffusers pipeline class (``encoders/diffusers_folder.py`` reads its
    folders with it)."""

    pipeline_class: str
    """The diffusers pipeline class named in model_index.json."""
    text_encoders: tuple[tuple[str, str, str], ...]
    """(our name, encoder subfolder, tokenizer subfolder) in combination order."""
    t5_tokens: int
    """The T5 sequence length the pipeline uses by default (its max_sequence_length)."""
    clip_hidden_layer: Optional[int]
    """The CLIP hidden layer whose states it takes (-2: penultimate; None: CLIP's states are not used)."""
    t5_dropped: str
    """What a dropped T5 input becomes (text encoder ``dropped``): zeros of its shape, or the empty caption."""
    steps: int
    """Its default num_inference_steps."""
    guidance_scale: float
    """Its default guidance, as flowmatch's ``guidance_scale`` (FLUX: the embedded guidance value)."""
    schedule: Schedule
    """How it walks the scheduler."""
    t5_padding: str = "max_length"
    """How it pads and masks its T5 (``text_encoder.padding``): max_length (SD3, FLUX) or max_length_plus_one
    (Chroma: the encoder given the mask, one padding token left visible to the transformer)."""
    decoder_llm: Optional[Mapping[str, Any]] = None
    """The TextEncoderConfig values of its decoder-LLM text encoder (kind decoder_llm: chat template, dropped
    prefix, hidden layer, length, pooling), for the encoder whose class is no CLIP or T5 (Qwen-Image's
    Qwen2.5-VL); None = CLIP and T5 only."""
    reference_size: Optional[Callable[[int, int, int], tuple[int, int]]] = None
    """``reference_size(height, width, multiple) -> (height, width)``: the pixel size it resizes a reference image
    to before encoding it (None: it takes no reference images)."""
    pack_latents: Optional[Callable[[Tensor], Tensor]] = None
    """``pack_latents(x (B, C, H, W)) -> latents``: what its ``__call__`` takes as ``latents=`` for our noise
    (None: FLUX.1's ``_pack_latents(x, B, C, H, W)`` when the family packs, else x itself)."""
    guidance_offset: float = 0.0
    """The pipeline's ``guidance_scale`` for flowmatch's scale g is g + this (Z-Image: -1, since ZImagePipeline
    guides as cond + g (cond - uncond), classifier-free guidance at g + 1)."""
    guidance_embed: Optional[bool] = None
    """Whether the transformer it runs must embed a guidance value (True: Flux2Pipeline passes ``guidance=``
    always), must not (False: Flux2KleinPipeline passes none), or either (None: FluxPipeline, dev and schnell);
    picks a family's pipeline for a run's model (:meth:`Family.export_pipeline`)."""


@dataclass(frozen=True)
class Family:
    """One model family, registered once in :data:`flowmatch.families.FAMILIES`."""

    name: str
    """The recipe's ``model.family``."""
    kind: str
    """The backbone it builds, as ``model.kind`` names it (recipes written before ``model.family``)."""
    summary: str
    """One line for listings and errors."""
    presets: Mapping[str, Mapping[str, Any]]
    """Named sizes, each as its difference from the config defaults (:mod:`flowmatch.families.presets`)."""
    tiny: str
    """The test-sized preset among them, which tests/test_families.py builds, runs and converts."""
    build: Callable[..., nn.Module]
    """``build(model_cfg, **kw) -> nn.Module``: the network of a recipe's model section."""
    claims: Callable[[Any], bool]
    """Whether a model section (or an MMDiTConfig) that names no family is this family's."""
    mismatch: str
    """What a model section must say to be this family's, for the error when it says otherwise."""
    capabilities: Capabilities
    """What the trainer may do with it."""
    time_scale: float
    """The model embeds ``t * time_scale`` (t in [0, 1], t = 1 noise); diffusers' timestep is the same number."""
    flops: Callable[..., float]
    """``flops(model_cfg, *, batch_size, latent_size, text_len, adapt=None) -> float``: training FLOPs of one
    step; ``adapt(model)`` changes the meta-device model counted first (LoRA: ``families.lora.training_flops``)."""
    latents: LatentLayout
    """The latent layout of its released pipeline."""
    converter: Optional[Converter] = None
    """Its diffusers and original-key converter (None: its weights are saved only as flowmatch's)."""
    lora_targets: Optional[Callable[[Any], list[str]]] = None
    """The diffusers module names LoRA adapts by default (diffusers' DreamBooth LoRA scripts)."""
    lora_formats: Mapping[str, LoraFormat] = field(default_factory=dict)
    """Its LoRA file layouts by name (``flowmatch/families/<family>/lora_formats.py``): those ``flowmatch export
    --lora --format`` writes, and those ``model.lora.init_from`` reads."""
    text: Optional[TextLayout] = None
    """How its released pipeline combines several text encoders (``text_encoders.combine: <family>``)."""
    diffusers: Optional[DiffusersPipeline] = None
    """Its diffusers pipeline class and behaviour: the default one (the first of :attr:`pipelines`)."""
    variants: tuple[DiffusersPipeline, ...] = ()
    """Further diffusers pipeline classes of the same transformer (FLUX.2: dev's Flux2Pipeline beside klein's
    Flux2KleinPipeline): a folder of one is read by its model_index.json ``_class_name``, and a run exports to one
    when its model and encoders are that variant's (:meth:`export_pipeline`)."""

    @property
    def pipelines(self) -> tuple[DiffusersPipeline, ...]:
        """Every diffusers pipeline class of the family, the default first (none without one)."""
        return ((self.diffusers,) if self.diffusers is not None else ()) + self.variants

    def export_pipeline(self, guidance_embed: bool, source: Optional[str] = None) -> Optional[DiffusersPipeline]:
        """The pipeline a run of the family is exported as, given whether its transformer embeds a guidance value
        and ``source``, the pipeline class its encoders were read from: that one when it is the family's (None
        when it does not run such a transformer: FLUX.2 dev's weights with klein's encoders), else the first of the
        family's that runs it (a Kontext run with FluxPipeline's encoders is a FluxKontextPipeline); None when
        none does or the family has no pipeline."""
        runs = [p for p in self.pipelines if p.guidance_embed in (None, bool(guidance_embed))]
        named = [p for p in self.pipelines if p.pipeline_class == source]
        if named:
            return named[0] if named[0] in runs else None
        return runs[0] if runs else None


@dataclass(frozen=True)
class FamilyPipeline:
    """One diffusers pipeline class as flowmatch knows it (:data:`flowmatch.families.PIPELINES`)."""

    family: Family
    """The family whose transformer it runs."""
    pipeline: DiffusersPipeline
    """What it does: its encoders, default call and schedule (the family's default or one of its variants)."""
