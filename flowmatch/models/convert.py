"""Weight conversion between flowmatch's MMDiT and diffusers' `SD3Transformer2DModel`.

Same inputs give the same outputs: our `model(x, t, Conditioning(hidden, mask, pooled))` with an all-True mask
(or with padding masked out) equals diffusers' `model(x, hidden, pooled, timestep=t * 1000)` on the real tokens.
The mapping, per diffusers module (diffusers 0.3x layout):

    pos_embed.proj (conv, out x C x p x p)    patch_embed (linear over (p_row, p_col, C) features)
    time_text_embed.timestep_embedder.*      time_embed.mlp.fc1 / fc2
    time_text_embed.text_embedder.*          pooled_embed.fc1 / fc2
    context_embedder                         context_embed
    transformer_blocks.i.norm1.linear         joint_blocks.i.img.mod.linear (same chunk order)
    ... attn.to_q | to_k | to_v               joint_blocks.i.img.qkv (stacked rows)
    ... attn.norm_q / norm_k, to_out.0, ff    img.q_norm / k_norm, img.proj, img.mlp
    ... norm1_context.linear                  joint_blocks.i.txt.mod.linear ((scale, shift) swapped to
                                              (shift, scale) in the context-pre-only last block)
    ... attn.add_q_proj | add_k_proj | add_v  txt.qkv (add_k | add_v only when pre-only: text queries unused)
    ... norm_added_q / norm_added_k, to_add_out, ff_context   txt.q_norm / k_norm, txt.proj, txt.mlp
    norm_out.linear ((scale, shift))          final.mod.linear ((shift, scale))
    proj_out                                  final.linear (same (p_row, p_col, C) output order)

The sin-cos position table `pos_embed.pos_embed` is not a weight: both sides compute it from the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from flowmatch.models.mmdit import MMDiT, MMDiTConfig

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel

#: Fixed hyperparameters of diffusers' SD3 transformer that our config exposes as fields.
SD3_MLP_RATIO = 4.0
SD3_TIME_FREQ_DIM = 256
SD3_NORM_EPS = 1e-6
SD3_TIME_SCALE = 1000.0

# Diffusers weights of a context-pre-only block that never influence its outputs (text queries).
_UNUSED_PRE_ONLY = ("attn.add_q_proj.weight", "attn.add_q_proj.bias", "attn.norm_added_q.weight")


@dataclass
class _Rule:
    """One of our tensors and the diffusers tensors it is made of."""

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    """copy | stack (rows concatenated) | swap (two row halves exchanged) | patch (conv kernel <-> linear)."""


def _linear(ours: str, *theirs: str, op: str = "copy") -> list[_Rule]:
    rules = [_Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), op)]
    rules.append(_Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), op))
    return rules


def _rules(cfg: MMDiTConfig) -> list[_Rule]:
    rules = _linear("patch_embed", "pos_embed.proj", op="patch")
    rules += _linear("time_embed.mlp.fc1", "time_text_embed.timestep_embedder.linear_1")
    rules += _linear("time_embed.mlp.fc2", "time_text_embed.timestep_embedder.linear_2")
    rules += _linear("pooled_embed.fc1", "time_text_embed.text_embedder.linear_1")
    rules += _linear("pooled_embed.fc2", "time_text_embed.text_embedder.linear_2")
    rules += _linear("context_embed", "context_embedder")
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == cfg.depth - 1
        rules += _linear(f"{ours}.img.mod.linear", f"{theirs}.norm1.linear")
        rules += _linear(f"{ours}.img.qkv", *(f"{theirs}.attn.to_{x}" for x in "qkv"), op="stack")
        rules += _linear(f"{ours}.img.proj", f"{theirs}.attn.to_out.0")
        rules += _linear(f"{ours}.img.mlp.fc1", f"{theirs}.ff.net.0.proj")
        rules += _linear(f"{ours}.img.mlp.fc2", f"{theirs}.ff.net.2")
        rules += _linear(f"{ours}.txt.mod.linear", f"{theirs}.norm1_context.linear", op="swap" if pre_only else "copy")
        txt_proj = "kv" if pre_only else "qkv"
        rules += _linear(f"{ours}.txt.qkv", *(f"{theirs}.attn.add_{x}_proj" for x in txt_proj), op="stack")
        if cfg.qk_norm:
            rules += [_Rule(f"{ours}.img.q_norm.weight", (f"{theirs}.attn.norm_q.weight",)),
                      _Rule(f"{ours}.img.k_norm.weight", (f"{theirs}.attn.norm_k.weight",)),
                      _Rule(f"{ours}.txt.k_norm.weight", (f"{theirs}.attn.norm_added_k.weight",))]
            if not pre_only:
                rules.append(_Rule(f"{ours}.txt.q_norm.weight", (f"{theirs}.attn.norm_added_q.weight",)))
        if not pre_only:
            rules += _linear(f"{ours}.txt.proj", f"{theirs}.attn.to_add_out")
            rules += _linear(f"{ours}.txt.mlp.fc1", f"{theirs}.ff_context.net.0.proj")
            rules += _linear(f"{ours}.txt.mlp.fc2", f"{theirs}.ff_context.net.2")
    rules += _linear("final.mod.linear", "norm_out.linear", op="swap")
    rules += _linear("final.linear", "proj_out")
    return rules


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _config_from_diffusers(dcfg) -> MMDiTConfig:
    dual = tuple(dcfg.get("dual_attention_layers", ()) or ())
    if dual:
        raise ValueError(
            f"diffusers dual_attention_layers={dual} (SD3.5-medium's MMDiT-X) are not supported by flowmatch's MMDiT"
        )
    qk_norm = dcfg.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"diffusers qk_norm={qk_norm!r} is not supported; flowmatch's MMDiT has none or 'rms_norm'")
    width = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg["caption_projection_dim"] != width:
        raise ValueError(
            f"caption_projection_dim={dcfg['caption_projection_dim']} differs from the model width {width}; "
            "such a model cannot run in diffusers either"
        )
    if not dcfg.get("pos_embed_max_size"):
        raise ValueError("diffusers models without pos_embed_max_size (uncropped position grid) are not supported")
    return MMDiTConfig(
        preset="custom", in_channels=dcfg["in_channels"], out_channels=dcfg["out_channels"],
        patch_size=dcfg["patch_size"], depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
        head_dim=dcfg["attention_head_dim"], mlp_ratio=SD3_MLP_RATIO, context_dim=dcfg["joint_attention_dim"],
        pooled_dim=dcfg["pooled_projection_dim"], sample_size=dcfg["sample_size"],
        pos_embed_max_size=dcfg["pos_embed_max_size"], qk_norm=qk_norm == "rms_norm", norm_eps=SD3_NORM_EPS,
        time_freq_dim=SD3_TIME_FREQ_DIM, time_scale=SD3_TIME_SCALE, single_blocks=0, rope=False,
    )


def from_diffusers_sd3(model_or_path: Union["SD3Transformer2DModel", str, os.PathLike]) -> MMDiT:
    """An MMDiT with the weights of a diffusers `SD3Transformer2DModel`, given as an instance or as a directory
    saved by `save_pretrained` (a pipeline directory with a `transformer/` subfolder also works; safetensors only).
    Raises ValueError for SD3 variants the MMDiT does not implement."""
    from diffusers import SD3Transformer2DModel

    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        subfolder = "transformer" if (path / "transformer" / "config.json").is_file() else None
        model_or_path = SD3Transformer2DModel.from_pretrained(path, subfolder=subfolder, use_safetensors=True)
    theirs = model_or_path.state_dict()
    cfg = _config_from_diffusers(model_or_path.config)
    p = cfg.patch_size

    ours: dict[str, Tensor] = {}
    used = {"pos_embed.pos_embed"} | {f"transformer_blocks.{cfg.depth - 1}.{k}" for k in _UNUSED_PRE_ONLY}
    for rule in _rules(cfg):
        parts = [theirs[k] for k in rule.theirs]
        used.update(rule.theirs)
        if rule.op == "stack":
            value = torch.cat(parts, dim=0)
        elif rule.op == "swap":
            value = _swap_halves(parts[0])
        elif rule.op == "patch" and parts[0].ndim == 4:
            value = parts[0].permute(0, 2, 3, 1).reshape(parts[0].shape[0], p * p * cfg.in_channels)
        else:
            value = parts[0].clone()
        ours[rule.ours] = value.contiguous()
    unused = sorted(set(theirs) - used)
    if unused:
        raise ValueError(f"diffusers weights with no counterpart in flowmatch's MMDiT: {unused[:8]}")

    model = MMDiT(cfg, device="meta")
    model.load_state_dict(ours, strict=True, assign=True)
    return model


def to_diffusers_sd3(mmdit: MMDiT) -> "SD3Transformer2DModel":
    """A diffusers `SD3Transformer2DModel` with `mmdit`'s weights (and dtype). Raises ValueError for options
    diffusers' SD3 does not have (RoPE, single-stream blocks, other MLP ratio, epsilon, or time scale)."""
    from diffusers import SD3Transformer2DModel

    cfg = mmdit.cfg
    fixed = dict(rope=False, single_blocks=0, mlp_ratio=SD3_MLP_RATIO, time_freq_dim=SD3_TIME_FREQ_DIM,
                 norm_eps=SD3_NORM_EPS, time_scale=SD3_TIME_SCALE)
    wrong = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"diffusers' SD3 transformer requires {fixed}; this model has {wrong}")
    p = cfg.patch_size
    model = SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=p, in_channels=cfg.in_channels, num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.width, pooled_projection_dim=cfg.pooled_dim, out_channels=mmdit.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size, qk_norm="rms_norm" if cfg.qk_norm else None,
    )
    ours = {k: v.detach() for k, v in mmdit.state_dict().items()}
    theirs = model.state_dict()
    out: dict[str, Tensor] = {"pos_embed.pos_embed": theirs["pos_embed.pos_embed"]}
    last = f"transformer_blocks.{cfg.depth - 1}."
    for key in _UNUSED_PRE_ONLY:
        if last + key in theirs:
            # Text queries of the last block only feed discarded outputs: any value gives the same results.
            fill = torch.ones_like if key.endswith("norm_added_q.weight") else torch.zeros_like
            out[last + key] = fill(theirs[last + key])
    for rule in _rules(cfg):
        value = ours[rule.ours]
        if rule.op == "stack":
            sizes = [theirs[k].shape[0] for k in rule.theirs]
            out.update(zip(rule.theirs, value.split(sizes, dim=0)))
        elif rule.op == "swap":
            out[rule.theirs[0]] = _swap_halves(value)
        elif rule.op == "patch" and value.ndim == 2:
            kernel = value.reshape(value.shape[0], p, p, cfg.in_channels).permute(0, 3, 1, 2)
            out[rule.theirs[0]] = kernel
        else:
            out[rule.theirs[0]] = value
    model.load_state_dict({k: v.to(theirs[k].dtype).contiguous() for k, v in out.items()}, strict=True)
    reference = next(mmdit.parameters())
    if reference.dtype != torch.float32:
        model = model.to(dtype=reference.dtype)
    return model.to(device=reference.device)
