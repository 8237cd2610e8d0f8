"""LoRA adapters on the MMDiT through peft, with targets named as diffusers names its modules: the shared
machinery. Which modules a family adapts by default and its key table come from the family
(:mod:`flowmatch.families.lora` applies them).

    lora = LoraConfig(rank=16, alpha=16)                  # targets None: the family's defaults
    chosen = apply_lora(model, lora)                      # flowmatch.families.lora: injects peft adapters

Targets are diffusers module names or dotted suffixes of them, matched the way peft matches `target_modules`
(the whole name, or a suffix after a dot), e.g. ``to_q``, ``attn.to_out.0``, ``ff_context.net.2``, ``proj_mlp``.
flowmatch's MMDiT fuses some of diffusers' projections into one linear (Q, K and V into ``qkv``; FLUX's single
blocks' Q, K, V and MLP input into ``linear_in``), and names the rest differently. :func:`projections` maps every
linear of ours to the diffusers modules it holds, read from the converter's key table (the one place both
namings meet), so targets never need our names. A LoRA ``B A`` on a fused projection is exactly one LoRA per
diffusers module with the same ``A`` and the matching rows of ``B`` (same rank, same alpha), which is how
:mod:`flowmatch.models.convert.lora` exports it. A fused projection is adapted whole: targeting some of its
diffusers modules and not the others (``to_q`` without ``to_k``) is an error that names the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from flowmatch.errors import RecipeError, nearest
from flowmatch.models.convert.keymap import ConvPatch, Rule
from flowmatch.models.lumina2 import ROPE_LAYOUT as LUMINA2_ROPE_LAYOUT
from flowmatch.models.lumina2 import Lumina2
from flowmatch.models.mmdit import MMDiT, MMDiTConfig
from flowmatch.models.zimage import ROPE_LAYOUT as ZIMAGE_ROPE_LAYOUT
from flowmatch.models.zimage import ZImage

#: The attention projections of a joint block, as diffusers names them.
ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
#: MMDiT-X's image-only second attention (SD3.5-medium).
ATTENTION2 = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
#: Name of the one adapter flowmatch injects (peft's default).
ADAPTER = "default"
#: The adapter kinds ``model.lora.kind`` names (:func:`peft_config` builds their peft configs;
#: :mod:`flowmatch.models.convert.adapters` writes their files).
KINDS = ("lora", "dora", "loha", "lokr")


@dataclass
class LoraConfig:
    """The recipe's `model.lora` section: low-rank adapters trained on frozen base weights (model.init_from)."""

    rank: int = 16
    """Rank r of each adapter (the inner width of B A)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) B A (diffusers' scripts set alpha = rank)."""
    targets: Optional[list[str]] = None
    """diffusers module names (or dotted suffixes) to adapt; None = the architecture's defaults."""
    dropout: float = 0.0
    """Dropout during training: on the adapters' input (lora, dora), on their rank components (loha, lokr)."""
    kind: str = "lora"
    """lora | dora (weight-decomposed LoRA) | loha (Hadamard product of two LoRAs) | lokr (Kronecker product)."""
    factor: int = -1
    """lokr: the Kronecker factor's size along each axis (peft's decompose_factor); -1 = near the square root."""
    init_from: Optional[str] = None
    """An adapter .safetensors file of this ``kind`` the adapters start from instead of peft's initialisation:
    diffusers', ComfyUI's or kohya's keys, or another trainer's (LoRA: ``flowmatch.models.convert.lora_read``, its
    rank at most ``rank``; dora, loha, lokr: ``flowmatch.models.convert.adapters_read``, its shapes the model's).
    Its modules must be exactly the targets'."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            near = nearest(self.kind, list(KINDS))
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ValueError(f"model.lora.kind: {self.kind!r} is not an adapter kind{hint}; allowed: "
                             f"{', '.join(KINDS)}")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"lora.factor must be -1 (near the square root) or >= 1, got {self.factor}")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0 (the update is alpha / rank x B A), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init_from is not None and not str(self.init_from).endswith(".safetensors"):
            raise ValueError(f"lora.init_from must be a .safetensors LoRA file (other files may be pickles, which "
                             f"can run code: convert them first), got {self.init_from!r}")

    @property
    def reads_base(self) -> bool:
        """Whether injecting reads the base weights (DoRA's magnitude starts at their row norms)."""
        return self.kind == "dora"

    @property
    def scale(self) -> float:
        """alpha / rank: peft's scaling of B A."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class Projection:
    """One linear of ours and the diffusers modules whose weights it holds."""

    ours: str
    """Our module name, e.g. joint_blocks.0.img.qkv."""
    theirs: tuple[str, ...]
    """diffusers module names, in the order their weight rows are stacked in ours."""
    op: object
    """The converter's weight operation (:mod:`flowmatch.models.convert.keymap`): how their rows make ours."""


def linear_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, int]]:
    """Our module name -> (out features, in features) of every linear of the model ``cfg`` describes."""
    # the modules the config describes: MMDiT unless its RoPE layout is one of the single-stream networks'
    network = {ZIMAGE_ROPE_LAYOUT: ZImage, LUMINA2_ROPE_LAYOUT: Lumina2}.get(cfg.rope_layout, MMDiT)
    return {name: (m.out_features, m.in_features) for name, m in network(cfg, device="meta").named_modules()
            if isinstance(m, nn.Linear)}


def projections(cfg: MMDiTConfig, rules: list[Rule]) -> list[Projection]:
    """Every linear of our model with its diffusers modules, from the family's diffusers key table ``rules``."""
    linears = linear_shapes(cfg)
    out = []
    for rule in rules:
        if rule.ours is None or not rule.ours.endswith(".weight"):
            continue
        module = rule.ours[:-len(".weight")]
        if module in linears:
            out.append(Projection(module, tuple(t[:-len(".weight")] for t in rule.theirs), rule.op))
    return out


def _matches(name: str, target: str) -> bool:
    """peft's rule: the whole module name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def select_from(available: list[Projection], targets: Optional[list[str]], defaults: list[str]) -> list[Projection]:
    """The projections of ``available`` the targets name (None = ``defaults``); RecipeError for a target that
    names nothing, a fused projection named only in part, or a layer LoRA cannot adapt here (the patch embedding,
    a convolution in diffusers)."""
    targets = list(defaults) if targets is None else list(targets)
    if not targets:
        raise RecipeError("model.lora.targets is empty: name diffusers modules (e.g. to_q, to_k, to_v) or leave it "
                          "null for the defaults")
    chosen, used = [], set()
    for proj in available:
        hits = [[t for t in targets if _matches(name, t)] for name in proj.theirs]
        used.update(t for h in hits for t in h)
        if not any(hits):
            continue
        if not all(hits):
            missing = [name for name, h in zip(proj.theirs, hits) if not h]
            raise RecipeError(f"model.lora.targets: flowmatch's {proj.ours} fuses diffusers' "
                              f"{', '.join(proj.theirs)} into one projection, adapted whole; the targets name only "
                              f"part of it: add {', '.join(m.rsplit('.', 1)[-1] for m in missing)} (as "
                              f"{missing[0]}) or remove the others")
        if isinstance(proj.op, ConvPatch):
            raise RecipeError(f"model.lora.targets: {proj.theirs[0]} (the patch embedding) is a convolution in "
                              "diffusers; LoRA adapts linear projections only here")
        chosen.append(proj)
    unknown = [t for t in targets if t not in used]
    if unknown:
        names = sorted({".".join(n.split(".")[-k:]) for p in available for n in p.theirs for k in (1, 2)})
        near = nearest(unknown[0], names)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise RecipeError(f"model.lora.targets: {unknown[0]!r} names no diffusers module of this architecture"
                          f"{hint}; e.g. {', '.join(defaults)}")
    return chosen


def peft_config(lora: LoraConfig, modules: list[str]):
    """The peft config of ``lora.kind`` (LoraConfig, with use_dora for dora; LoHaConfig; LoKrConfig) adapting
    exactly `modules` (full module names)."""
    import peft  # peft loads transformers: only LoRA runs pay for it

    if lora.kind == "loha":
        return peft.LoHaConfig(r=lora.rank, alpha=lora.alpha, rank_dropout=lora.dropout, target_modules=modules)
    if lora.kind == "lokr":
        return peft.LoKrConfig(r=lora.rank, alpha=lora.alpha, rank_dropout=lora.dropout, target_modules=modules,
                          decompose_factor=lora.factor)
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules,
                          use_dora=lora.kind == "dora")


def inject(model: nn.Module, lora: LoraConfig, chosen: list[Projection]) -> list[Projection]:
    """Freeze `model` and inject adapters on the `chosen` projections (peft, in place; A random, B zero, so the
    output is unchanged); returns them. Seed torch first: A is drawn from its generator."""
    from peft import inject_adapter_in_model  # peft loads transformers: only LoRA runs pay for it

    model.requires_grad_(False)
    inject_adapter_in_model(peft_config(lora, [p.ours for p in chosen]), model, adapter_name=ADAPTER)
    if lora.kind == "dora":
        _check_magnitudes(model)
    return chosen


def _check_magnitudes(model: nn.Module) -> None:
    """DoRA divides by each output row's weight norm, which peft starts its magnitude at: a zero row (a
    zero-initialised, untrained layer) would make the output NaN."""
    for name, p in model.named_parameters():
        if ".lora_magnitude_vector." in name and p.device.type != "meta" and p.numel() and not bool(p.all()):
            module = name.split(".lora_magnitude_vector.")[0]
            raise RecipeError(f"model.lora.kind: dora divides by the norm of each output row of the weight, and "
                              f"{module} has all-zero rows (a zero-initialised layer that was never trained): "
                              "remove its diffusers name from model.lora.targets or use kind lora")


def adapter_key(module: str, factor: str) -> str:
    """Our name of an adapter factor ("A" or "B") of `module` in the model's state dict."""
    return f"{module}.lora_{factor}.{ADAPTER}.weight"


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter's (any kind: peft names each ``<module>.<factor>.default[.weight]``)."""
    return f".{ADAPTER}." in f"{name}."
