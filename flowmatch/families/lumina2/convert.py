"""Lumina-Image-2: diffusers' `Lumina2Transformer2DModel` against flowmatch's :class:`flowmatch.models.lumina2.Lumina2`
(its family is registered in :mod:`flowmatch.families.lumina2`).

Same inputs give the same outputs: our ``model(x, t, Conditioning(hidden, mask, pooled (B, 0)))`` equals
``-diffusers(x, timestep=1 - t, encoder_hidden_states=hidden, encoder_attention_mask=mask)`` (the release's
reversed time and velocity; the latents are not packed, the transformer patchifies them in the same order).

    flowmatch                                diffusers
    patch_embed                              x_embedder
    time_embed.mlp.fc1 / fc2                 time_caption_embed.timestep_embedder.linear_1 / linear_2
    context_norm / context_embed             time_caption_embed.caption_embedder.0 / .1
    <blocks>.i.mod.linear                    <blocks>.i.norm1.linear (modulated blocks)
    <blocks>.i.attn_norm_in                  <blocks>.i.norm1.norm (modulated) or .norm1 (context refiners)
    <blocks>.i.attn.qkv (rows q, k, v)       <blocks>.i.attn.to_q | to_k | to_v (stacked)
    <blocks>.i.attn.proj                     <blocks>.i.attn.to_out.0
    <blocks>.i.attn.q_norm / k_norm          <blocks>.i.attn.norm_q / norm_k
    <blocks>.i.attn_norm_out                 <blocks>.i.norm2
    <blocks>.i.ffn_norm_in / ffn_norm_out    <blocks>.i.ffn_norm1 / ffn_norm2
    <blocks>.i.ffn.w1 / w2 / w3              <blocks>.i.feed_forward.linear_1 / linear_2 / linear_3
    final.mod.linear / final.linear          norm_out.linear_1 / linear_2

with <blocks> one of context_refiner, noise_refiner and layers (the same names on both sides). The modulation
chunks are (scale, gate) for attention then feed-forward in both. The original keys (Alpha-VLLM's checkpoint;
ComfyUI's single file puts them under ``model.diffusion_model.``) are :data:`ORIGINAL`'s: ``attention.qkv`` fused
as ours, ``attention.out``, ``feed_forward.w1..w3``, ``attention_norm1/2``, ``adaLN_modulation.1``,
``t_embedder.mlp``, ``cap_embedder``, ``final_layer``, and an unused ``norm_final`` scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from flowmatch.models.convert.keymap import Copy, Inert, Op, Rule, Stack, linear, mlp, norm
from flowmatch.models.lumina2 import ROPE_LAYOUT
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "Lumina2Transformer2DModel"
#: ComfyUI's single-file saves prefix the transformer's (diffusers-named) keys so.
ORIGINAL_PREFIX = "model.diffusion_model."
#: The release's RoPE tables' lengths per axis (caption positions, rows, columns); flowmatch computes angles for
#: any position, so they only travel back into an exported config.
AXES_LENS = (300, 512, 512)
#: The release's head width and RoPE split (not stored in the single-file keys).
RELEASE_HEAD_DIM, RELEASE_AXES = 96, (32, 32, 32)
#: The release's patch side (not stored in the single-file keys).
PATCH = 2
#: The LuminaFeedForward inner width before its multiplier: 4 x the model width.
FFN_BASE_RATIO = 4.0
#: Fixed hyperparameters of the release that MMDiTConfig exposes as fields.
FIXED = dict(time_freq_dim=256, time_scale=1.0, rope=True, rope_layout=ROPE_LAYOUT, rope_theta=10000.0, qk_norm=True,
             dual_attention_layers=[], single_blocks=0, pooled_dim=0, context_norm=True, guidance_embed=False,
             modulation="adaln", interval_embed=False, references=0)
#: The key only Lumina-Image-2's original checkpoints have.
ORIGINAL_MARK = "cap_embedder.0.weight"
#: Their block lists, named as ours.
BLOCK_LISTS = ("context_refiner", "noise_refiner", "layers")


def is_original(keys) -> bool:
    """Whether un-prefixed single-file keys are Lumina-Image-2's."""
    return ORIGINAL_MARK in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `Lumina2Transformer2DModel` config; ValueError for variants we do not implement."""
    d, heads = dcfg["hidden_size"], dcfg["num_attention_heads"]
    axes = list(dcfg.get("axes_dim_rope") or (32, 32, 32))
    wrong = {}
    if len(axes) != 3 or sum(axes) != d // heads or d % heads:
        wrong["axes_dim_rope"] = axes
    if dcfg.get("scaling_factor", 1.0) != 1.0:
        wrong["scaling_factor"] = dcfg["scaling_factor"]
    if wrong:
        raise ValueError(f"Lumina-Image-2 transformers with {wrong} are not supported: flowmatch implements three "
                         "RoPE axes summing to the head width and scaling_factor 1")
    multiplier = dcfg.get("ffn_dim_multiplier")
    c_in, out = dcfg["in_channels"], dcfg.get("out_channels") or dcfg["in_channels"]
    return MMDiTConfig(
        in_channels=c_in, out_channels=None if out == c_in else out, patch_size=dcfg.get("patch_size", 2),
        sample_size=dcfg.get("sample_size", 128), depth=dcfg["num_layers"],
        refiner_layers=dcfg.get("num_refiner_layers", 2), num_heads=heads, head_dim=d // heads,
        kv_heads=dcfg.get("num_kv_heads") or heads, context_dim=dcfg["cap_feat_dim"],
        mlp_ratio=FFN_BASE_RATIO * (multiplier if multiplier is not None else 1.0),
        ffn_multiple_of=dcfg.get("multiple_of", 256), norm_eps=dcfg.get("norm_eps", 1e-5), rope_axes_dim=axes,
        **FIXED,
    )


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `Lumina2Transformer2DModel` config of our config; ValueError for options diffusers' class does not
    have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if len(cfg.axes_dim) != 3 or sum(cfg.axes_dim) != cfg.head_dim:
        wrong["rope_axes_dim"] = cfg.rope_axes_dim
    if wrong:
        raise ValueError(f"diffusers' Lumina-Image-2 transformer requires {FIXED} and three RoPE axes summing to "
                         f"head_dim; this model has {wrong}")
    multiplier = cfg.mlp_ratio / FFN_BASE_RATIO
    return dict(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, hidden_size=cfg.width, num_layers=cfg.depth,
        num_refiner_layers=cfg.refiner_layers, num_attention_heads=cfg.num_heads,
        num_kv_heads=cfg.kv_heads or cfg.num_heads, multiple_of=cfg.ffn_multiple_of,
        ffn_dim_multiplier=None if multiplier == 1.0 else multiplier, norm_eps=cfg.norm_eps, scaling_factor=1.0,
        axes_dim_rope=tuple(cfg.axes_dim), axes_lens=AXES_LENS, cap_feat_dim=cfg.context_dim,
    )


def _weight(ours: str, theirs: str, op: Op = Copy()) -> Rule:
    """The rule for a bias-free linear's weight."""
    return Rule(f"{ours}.weight", (f"{theirs}.weight",), op)


@dataclass(frozen=True)
class Names:
    """Where a layout keeps a block's tensors (relative to the block) and the model's others."""

    mod: str
    norm_in: tuple[str, str]
    """The attention's input RMSNorm: (in a modulated block, in a context refiner)."""
    norm_out: str
    ffn_norms: tuple[str, str]
    qkv: Optional[tuple[str, str, str]]
    """Separate query, key and value projections, or None for the original's fused ``attention.qkv``."""
    out: str
    qk_norms: tuple[str, str]
    ffn: tuple[str, str, str]
    time: tuple[str, str, str]
    caption: tuple[str, str]
    final: tuple[str, str]


DIFFUSERS = Names(
    mod="norm1.linear", norm_in=("norm1.norm", "norm1"), norm_out="norm2", ffn_norms=("ffn_norm1", "ffn_norm2"),
    qkv=("attn.to_q", "attn.to_k", "attn.to_v"), out="attn.to_out.0", qk_norms=("attn.norm_q", "attn.norm_k"),
    ffn=tuple(f"feed_forward.linear_{k}" for k in (1, 2, 3)),
    time=("time_caption_embed.timestep_embedder", "linear_1", "linear_2"),
    caption=("time_caption_embed.caption_embedder.0", "time_caption_embed.caption_embedder.1"),
    final=("norm_out.linear_1", "norm_out.linear_2"))
ORIGINAL = Names(
    mod="adaLN_modulation.1", norm_in=("attention_norm1", "attention_norm1"), norm_out="attention_norm2",
    ffn_norms=("ffn_norm1", "ffn_norm2"), qkv=None, out="attention.out",
    qk_norms=("attention.q_norm", "attention.k_norm"), ffn=tuple(f"feed_forward.w{k}" for k in (1, 2, 3)),
    time=("t_embedder.mlp", "0", "2"), caption=("cap_embedder.0", "cap_embedder.1"),
    final=("final_layer.adaLN_modulation.1", "final_layer.linear"))
#: The original checkpoint's final RMSNorm scale, which nothing reads (diffusers' converter drops it too).
UNUSED_ORIGINAL = "norm_final.weight"


def _rules(cfg: MMDiTConfig, n: Names) -> list[Rule]:
    rules = linear("patch_embed", "x_embedder")
    rules += mlp("time_embed.mlp", n.time[0], n.time[1:])
    rules += [norm("context_norm", f"{n.caption[0]}.weight")]
    rules += linear("context_embed", n.caption[1])
    counts = dict(context_refiner=cfg.refiner_layers, noise_refiner=cfg.refiner_layers, layers=cfg.depth)
    kv = (cfg.kv_heads or cfg.num_heads) * cfg.head_dim
    qkv = Stack((cfg.width, kv, kv))
    for blocks in BLOCK_LISTS:
        modulated = blocks != "context_refiner"  # context refiners have no modulation: norm1 is the RMSNorm
        for i in range(counts[blocks]):
            b = f"{blocks}.{i}"
            if modulated:
                rules += linear(f"{b}.mod.linear", f"{b}.{n.mod}")
            rules.append(norm(f"{b}.attn_norm_in", f"{b}.{n.norm_in[0 if modulated else 1]}.weight"))
            if n.qkv is None:  # the original's fused projection: queries, then keys, then values
                rules.append(_weight(f"{b}.attn.qkv", f"{b}.attention.qkv"))
            else:
                rules.append(Rule(f"{b}.attn.qkv.weight", tuple(f"{b}.{x}.weight" for x in n.qkv), qkv))
            rules += [_weight(f"{b}.attn.proj", f"{b}.{n.out}"),
                      norm(f"{b}.attn.q_norm", f"{b}.{n.qk_norms[0]}.weight"),
                      norm(f"{b}.attn.k_norm", f"{b}.{n.qk_norms[1]}.weight")]
            rules += [norm(f"{b}.attn_norm_out", f"{b}.{n.norm_out}.weight"),
                      norm(f"{b}.ffn_norm_in", f"{b}.{n.ffn_norms[0]}.weight"),
                      norm(f"{b}.ffn_norm_out", f"{b}.{n.ffn_norms[1]}.weight")]
            rules += [_weight(f"{b}.ffn.w{k}", f"{b}.{theirs}") for k, theirs in zip((1, 2, 3), n.ffn)]
    rules += linear("final.mod.linear", n.final[0])
    rules += linear("final.linear", n.final[1])
    return rules


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    return _rules(cfg, DIFFUSERS)


def _unit_scale(width: int, dtype: torch.dtype) -> Tensor:
    return torch.ones(width, dtype=dtype)


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    """Alpha-VLLM's keys (ComfyUI's single file puts them under ``model.diffusion_model.``): fused QKV, the
    original module names, and the unused final norm scale kept inert."""
    unused = Rule(None, (UNUSED_ORIGINAL,), Inert(partial(_unit_scale, cfg.width)))
    return _rules(cfg, ORIGINAL) + [unused]


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed single-file keys. The RoPE split is not stored: the release's
    (32, 32, 32) is taken for 96-channel heads; other head widths need ``rope_axes_dim`` given
    (:func:`check_original`). The SwiGLU width is read as it is (multiple 1)."""
    def count(prefix: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith(prefix)), default=-1)

    x_embed = sd["x_embedder.weight"]  # (D, p p C)
    width = x_embed.shape[0]
    head_dim = head_dim or sd["layers.0.attention.q_norm.weight"].shape[0]  # the QK-norm scale is per head channel
    out_features = sd["final_layer.linear.weight"].shape[0]
    kv = (sd["layers.0.attention.qkv.weight"].shape[0] - width) // (2 * head_dim)
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    patch = PATCH
    c_in, out = x_embed.shape[1] // (patch * patch), out_features // (patch * patch)
    return MMDiTConfig(
        in_channels=c_in, out_channels=None if out == c_in else out, patch_size=patch, depth=count("layers."),
        refiner_layers=count("noise_refiner."), num_heads=width // head_dim, head_dim=head_dim, kv_heads=kv,
        context_dim=sd[ORIGINAL_MARK].shape[0], mlp_ratio=hidden / width, ffn_multiple_of=1,
        norm_eps=1e-5, rope_axes_dim=list(RELEASE_AXES) if head_dim == RELEASE_HEAD_DIM else None, **FIXED,
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the head width or the RoPE split, which the single-file keys do not store, do not fit."""
    if cfg.width % cfg.head_dim or not (cfg.rope_axes_dim and len(cfg.axes_dim) == 3
                                        and sum(cfg.axes_dim) == cfg.head_dim):
        raise ValueError(f"Lumina-Image-2 weights of width {cfg.width}: pass head_dim and rope_axes_dim (three sizes "
                         "summing to head_dim) as the model was trained; the release uses 96 and (32, 32, 32)")
