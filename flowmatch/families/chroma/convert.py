"""Chroma: diffusers' `ChromaTransformer2DModel` and the release's original single-file keys (lodestones'
Chroma1-HD safetensors: FLUX.1's `double_blocks.*` / `single_blocks.*` without their modulation, plus
`distilled_guidance_layer.*`) against flowmatch's MMDiT with ``modulation: approximator``.

The blocks, embedders and final projection are FLUX.1's, so their key tables are FLUX's
(:mod:`flowmatch.families.flux.convert`, which leaves out the per-block modulation and the timestep and pooled
embedders for this layout); this module adds the approximator's:

    flowmatch                            diffusers (distilled_guidance_layer.)  original (the same prefix)
    approximator.in_proj                 in_proj                                 in_proj
    approximator.layers.k.norm           norms.k                                 norms.k (.scale)
    approximator.layers.k.mlp.fc1 / fc2  layers.k.linear_1 / linear_2            layers.k.in_layer / out_layer
    approximator.out_proj                out_proj                                out_proj

The final layer's (shift, scale) come from the approximator in that order in both layouts (no swap, unlike
FLUX's norm_out.linear). Same inputs give the same outputs: our ``model(x, t, Conditioning(hidden, mask, _))``
equals diffusers' ``model(pack(x), hidden, timestep=t, img_ids, txt_ids, attention_mask=bool mask)`` unpacked,
as for FLUX (:mod:`flowmatch.families.flux.convert`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.flux import convert as flux
from flowmatch.families.flux.convert import (  # noqa: F401 - FLUX's packing and RoPE check hold for Chroma
    AXES_DIM,
    PACK,
    check_original,
)
from flowmatch.models.convert.keymap import Rule, linear, mlp, norm
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "ChromaTransformer2DModel"
#: The release's single file stores the transformer's keys without a prefix.
ORIGINAL_PREFIX = ""
#: FLUX's fixed hyperparameters, with the modulation approximator in place of per-block modulation.
FIXED = {**flux.FIXED, "modulation": "approximator"}
#: The approximator's input channels, width and residual layers in the release (ChromaTransformer2DModel's
#: defaults).
APPROXIMATOR = dict(approximator_channels=64, approximator_hidden=5120, approximator_layers=5)
#: The key only Chroma's original files have.
ORIGINAL_MARK = "distilled_guidance_layer.in_proj.weight"


def is_original(keys) -> bool:
    """Whether un-prefixed original keys are Chroma's."""
    return ORIGINAL_MARK in keys and "double_blocks.0.img_attn.qkv.weight" in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `ChromaTransformer2DModel` config; ValueError for variants we do not implement."""
    return MMDiTConfig(
        **{**flux.packed_fields(dcfg, "Chroma"), **FIXED}, pooled_dim=0,
        approximator_channels=dcfg.get("approximator_num_channels", APPROXIMATOR["approximator_channels"]),
        approximator_hidden=dcfg.get("approximator_hidden_dim", APPROXIMATOR["approximator_hidden"]),
        approximator_layers=dcfg.get("approximator_layers", APPROXIMATOR["approximator_layers"]),
    )


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `ChromaTransformer2DModel` config of our config; ValueError for options diffusers' Chroma does not
    have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if len(cfg.axes_dim) != 3 or sum(cfg.axes_dim) != cfg.head_dim:
        wrong["rope_axes_dim"] = cfg.rope_axes_dim
    if wrong:
        raise ValueError(f"diffusers' Chroma transformer requires {FIXED} and three RoPE axes summing to "
                         f"head_dim; this model has {wrong}")
    return dict(flux.packed_config(cfg), approximator_num_channels=cfg.approximator_channels,
                approximator_hidden_dim=cfg.approximator_hidden, approximator_layers=cfg.approximator_layers)


def diffusers_buffers(model) -> dict[str, Tensor]:
    """The tensors diffusers' Chroma keeps outside its state dict, which a model built on the meta device lacks:
    the approximator's row-index sinusoids (``time_text_embed.mod_proj``)."""
    return {"time_text_embed.mod_proj": model.approximator.row_inputs(model.approximator.in_proj.weight.device)}


def _approximator(cfg: MMDiTConfig, layer: tuple[str, str], scale: str) -> list[Rule]:
    """The approximator's keys: ``layer`` names its MLPs' two linears, ``scale`` its norms' weight."""
    theirs = "distilled_guidance_layer"
    rules = linear("approximator.in_proj", f"{theirs}.in_proj")
    for k in range(cfg.approximator_layers):
        rules += mlp(f"approximator.layers.{k}.mlp", f"{theirs}.layers.{k}", layer)
        rules.append(norm(f"approximator.layers.{k}.norm", f"{theirs}.norms.{k}.{scale}"))
    return rules + linear("approximator.out_proj", f"{theirs}.out_proj")


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    return flux.diffusers_rules(cfg) + _approximator(cfg, ("linear_1", "linear_2"), "weight")


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    return flux.original_rules(cfg) + _approximator(cfg, ("in_layer", "out_layer"), "scale")


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed Chroma keys. The RoPE split is not stored: FLUX.1's (16, 56, 56) is
    taken for 128-channel heads; other head widths need ``rope_axes_dim`` given."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("double_blocks."))
    singles = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_blocks."))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("distilled_guidance_layer.layers."))
    img_in, in_proj = sd["img_in.weight"], sd[ORIGINAL_MARK]  # (D, 4 C), (hidden, channels)
    width, packed = img_in.shape[0], PACK * PACK
    out = sd["final_layer.linear.weight"].shape[0] // packed
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return MMDiTConfig(
        in_channels=img_in.shape[1] // packed, out_channels=None if out == img_in.shape[1] // packed else out,
        depth=depth, single_blocks=singles, num_heads=width // head_dim, head_dim=head_dim,
        context_dim=sd["txt_in.weight"].shape[1], pooled_dim=0,
        rope_axes_dim=list(AXES_DIM) if head_dim == 128 else None,
        approximator_channels=in_proj.shape[1], approximator_hidden=in_proj.shape[0], approximator_layers=layers,
        **{**FIXED, "mlp_ratio": sd["double_blocks.0.img_mlp.0.weight"].shape[0] / width},
    )
