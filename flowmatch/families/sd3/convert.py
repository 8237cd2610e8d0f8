"""SD3, SD3.5-medium (MMDiT-X) and SD3.5-large: diffusers' `SD3Transformer2DModel` and the original single-file
keys (`joint_blocks.*`, as Stability AI's releases and ComfyUI store them) against flowmatch's MMDiT.

Same inputs give the same outputs: our `model(x, t, Conditioning(hidden, mask, pooled))` with an all-True mask
(or with padding masked out) equals diffusers' `model(x, hidden, pooled, timestep=t * 1000)` on the real tokens.

    flowmatch                      diffusers                                  original
    patch_embed (linear, (pr,pc,C)) pos_embed.proj (conv)                      x_embedder.proj (conv)
    time_embed.mlp.fc1 / fc2       time_text_embed.timestep_embedder.linear_1/2 t_embedder.mlp.0 / 2
    pooled_embed.fc1 / fc2         time_text_embed.text_embedder.linear_1/2    y_embedder.mlp.0 / 2
    context_embed                  context_embedder                           context_embedder
    joint_blocks.i.img.mod.linear  transformer_blocks.i.norm1.linear          joint_blocks.i.x_block.adaLN_modulation.1
      .img.qkv                     .attn.to_q | to_k | to_v (stacked)         .x_block.attn.qkv
      .img.q_norm / k_norm         .attn.norm_q / norm_k                      .x_block.attn.ln_q / ln_k
      .img.proj, .img.mlp          .attn.to_out.0, .ff.net.0.proj / .ff.net.2 .x_block.attn.proj, .x_block.mlp
      .img.attn2.* (MMDiT-X)       .attn2.to_q|k|v, norm_q/k, to_out.0        .x_block.attn2.qkv, ln_q/k, proj
      .txt.*                       .norm1_context, .attn.add_*_proj, norm_added_*, to_add_out, ff_context
                                                                              .context_block.* (as x_block)
    final.mod.linear (shift,scale) norm_out.linear (scale, shift)             final_layer.adaLN_modulation.1
    final.linear                   proj_out                                   final_layer.linear

The last block's text stream is context-pre-only: its queries (diffusers' `add_q_proj`, `norm_added_q`; the
first third of the original `qkv` and its `ln_q`) and the stored position table never reach an output and are
inert (see :mod:`flowmatch.models.convert.keymap`). diffusers' pre-only text modulation is (scale, shift), the
original one (shift, scale) like ours. The family is registered in :mod:`flowmatch.families.sd3`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from flowmatch.families.mmdit import TIME_SCALE
from flowmatch.models.convert.keymap import ConvPatch, Copy, Inert, Rule, Stack, SwapHalves, Tail, linear, mlp, norm
from flowmatch.models.embeddings import sincos_pos_embed_2d
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "SD3Transformer2DModel"
#: Single-file releases (sd3_medium.safetensors, sd3.5_large.safetensors) prefix the transformer's keys so.
ORIGINAL_PREFIX = "model.diffusion_model."
#: Fixed hyperparameters of SD3's transformer that MMDiTConfig exposes as fields.
FIXED = dict(mlp_ratio=4.0, time_freq_dim=256, norm_eps=1e-6, time_scale=TIME_SCALE, rope=False, single_blocks=0,
             guidance_embed=False)
#: Head width of every SD3 release; the original keys only show it through the QK-norm scales.
HEAD_DIM = 64
#: Latent side SD3's position grid is scaled to (1024 px / 8): diffusers' `sample_size`.
SAMPLE_SIZE = 128


def is_original(keys) -> bool:
    """Whether un-prefixed original keys are SD3's."""
    return "joint_blocks.0.x_block.attn.qkv.weight" in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `SD3Transformer2DModel` config; ValueError for variants we do not implement."""
    qk_norm = dcfg.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"diffusers qk_norm={qk_norm!r} is not supported; flowmatch's MMDiT has none or 'rms_norm'")
    width = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg["caption_projection_dim"] != width:
        raise ValueError(f"caption_projection_dim={dcfg['caption_projection_dim']} differs from the model width "
                         f"{width}; such a model cannot run in diffusers either")
    if not dcfg.get("pos_embed_max_size"):
        raise ValueError("diffusers models without pos_embed_max_size (uncropped position grid) are not supported")
    return MMDiTConfig(
        in_channels=dcfg["in_channels"], out_channels=_out_channels(dcfg.get("out_channels"), dcfg["in_channels"]),
        patch_size=dcfg["patch_size"], depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"],
        head_dim=dcfg["attention_head_dim"], context_dim=dcfg["joint_attention_dim"],
        pooled_dim=dcfg["pooled_projection_dim"], sample_size=dcfg["sample_size"],
        pos_embed_max_size=dcfg["pos_embed_max_size"], qk_norm=qk_norm == "rms_norm",
        dual_attention_layers=sorted(dcfg.get("dual_attention_layers") or ()), **FIXED,
    )


def _out_channels(out, in_channels):
    """Our out_channels: None when equal to in_channels, as the presets write it."""
    return None if out in (None, in_channels) else out


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `SD3Transformer2DModel` config of our config; ValueError for options diffusers' SD3 does not have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"diffusers' SD3 transformer requires {FIXED}; this model has {wrong}")
    return dict(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.width, pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels or cfg.in_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm" if cfg.qk_norm else None,
    )


def _diffusers_pos_embed(cfg: MMDiTConfig) -> Tensor:
    # diffusers' own table (PatchEmbed's buffer), so that a converted model equals a freshly built one bitwise.
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(cfg.width, cfg.pos_embed_max_size, base_size=cfg.sample_size // cfg.patch_size,
                                    interpolation_scale=1, output_type="pt")
    return table.float().unsqueeze(0)


def _pos_embed(cfg: MMDiTConfig) -> Tensor:
    """The full (1, max^2, D) sin-cos table the model crops from, float32."""
    m = cfg.pos_embed_max_size
    return sincos_pos_embed_2d(m, m, cfg.width, base_size=cfg.sample_size // cfg.patch_size, max_size=m,
                               device=torch.device("cpu"))[None]


def _zeros(*shape: int):
    return lambda dtype: torch.zeros(shape, dtype=dtype)


def _ones(*shape: int):
    return lambda dtype: torch.ones(shape, dtype=dtype)


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    d, hd = cfg.width, cfg.head_dim
    rules = [Rule(None, ("pos_embed.pos_embed",), Inert(lambda dtype: _diffusers_pos_embed(cfg)))]
    rules += linear("patch_embed", "pos_embed.proj", op=ConvPatch(cfg.patch_size, cfg.in_channels), bias_op=Copy())
    rules += mlp("time_embed.mlp", "time_text_embed.timestep_embedder", ("linear_1", "linear_2"))
    rules += mlp("pooled_embed", "time_text_embed.text_embedder", ("linear_1", "linear_2"))
    rules += linear("context_embed", "context_embedder")
    qkv = Stack((d, d, d))
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == cfg.depth - 1
        rules += linear(f"{ours}.img.mod.linear", f"{theirs}.norm1.linear")
        rules += linear(f"{ours}.img.qkv", *(f"{theirs}.attn.to_{x}" for x in "qkv"), op=qkv)
        rules += linear(f"{ours}.img.proj", f"{theirs}.attn.to_out.0")
        rules += mlp(f"{ours}.img.mlp", f"{theirs}.ff.net", ("0.proj", "2"))
        rules += linear(f"{ours}.txt.mod.linear", f"{theirs}.norm1_context.linear",
                        op=SwapHalves() if pre_only else Copy())
        if i in cfg.dual_attention_layers:
            rules += linear(f"{ours}.img.attn2.qkv", *(f"{theirs}.attn2.to_{x}" for x in "qkv"), op=qkv)
            rules += linear(f"{ours}.img.attn2.proj", f"{theirs}.attn2.to_out.0")
            if cfg.qk_norm:
                rules += [norm(f"{ours}.img.attn2.q_norm", f"{theirs}.attn2.norm_q.weight"),
                          norm(f"{ours}.img.attn2.k_norm", f"{theirs}.attn2.norm_k.weight")]
        if pre_only:
            # Text queries of the last block only feed discarded outputs.
            rules += linear(f"{ours}.txt.qkv", *(f"{theirs}.attn.add_{x}_proj" for x in "kv"), op=Stack((d, d)))
            rules += [Rule(None, (f"{theirs}.attn.add_q_proj.weight",), Inert(_zeros(d, d))),
                      Rule(None, (f"{theirs}.attn.add_q_proj.bias",), Inert(_zeros(d)))]
        else:
            rules += linear(f"{ours}.txt.qkv", *(f"{theirs}.attn.add_{x}_proj" for x in "qkv"), op=qkv)
            rules += linear(f"{ours}.txt.proj", f"{theirs}.attn.to_add_out")
            rules += mlp(f"{ours}.txt.mlp", f"{theirs}.ff_context.net", ("0.proj", "2"))
        if cfg.qk_norm:
            rules += [norm(f"{ours}.img.q_norm", f"{theirs}.attn.norm_q.weight"),
                      norm(f"{ours}.img.k_norm", f"{theirs}.attn.norm_k.weight"),
                      norm(f"{ours}.txt.k_norm", f"{theirs}.attn.norm_added_k.weight")]
            rules.append(Rule(None, (f"{theirs}.attn.norm_added_q.weight",), Inert(_ones(hd))) if pre_only
                         else norm(f"{ours}.txt.q_norm", f"{theirs}.attn.norm_added_q.weight"))
    rules += linear("final.mod.linear", "norm_out.linear", op=SwapHalves())
    rules += linear("final.linear", "proj_out")
    return rules


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    d, hd = cfg.width, cfg.head_dim
    rules = [Rule(None, ("pos_embed",), Inert(lambda dtype: _pos_embed(cfg).to(dtype)))]
    rules += linear("patch_embed", "x_embedder.proj", op=ConvPatch(cfg.patch_size, cfg.in_channels), bias_op=Copy())
    rules += mlp("time_embed.mlp", "t_embedder.mlp", ("0", "2")) + mlp("pooled_embed", "y_embedder.mlp", ("0", "2"))
    rules += linear("context_embed", "context_embedder")
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"joint_blocks.{i}"
        pre_only = i == cfg.depth - 1
        for stream, block in (("img", "x_block"), ("txt", "context_block")):
            last_txt = pre_only and stream == "txt"
            rules += linear(f"{ours}.{stream}.mod.linear", f"{theirs}.{block}.adaLN_modulation.1")
            rules += linear(f"{ours}.{stream}.qkv", f"{theirs}.{block}.attn.qkv", op=Tail(d) if last_txt else Copy())
            if cfg.qk_norm:
                rules.append(Rule(None, (f"{theirs}.{block}.attn.ln_q.weight",), Inert(_ones(hd))) if last_txt
                             else norm(f"{ours}.{stream}.q_norm", f"{theirs}.{block}.attn.ln_q.weight"))
                rules.append(norm(f"{ours}.{stream}.k_norm", f"{theirs}.{block}.attn.ln_k.weight"))
            if not last_txt:
                rules += linear(f"{ours}.{stream}.proj", f"{theirs}.{block}.attn.proj")
                rules += mlp(f"{ours}.{stream}.mlp", f"{theirs}.{block}.mlp", ("fc1", "fc2"))
        if i in cfg.dual_attention_layers:
            rules += linear(f"{ours}.img.attn2.qkv", f"{theirs}.x_block.attn2.qkv")
            rules += linear(f"{ours}.img.attn2.proj", f"{theirs}.x_block.attn2.proj")
            if cfg.qk_norm:
                rules += [norm(f"{ours}.img.attn2.q_norm", f"{theirs}.x_block.attn2.ln_q.weight"),
                          norm(f"{ours}.img.attn2.k_norm", f"{theirs}.x_block.attn2.ln_k.weight")]
    rules += linear("final.mod.linear", "final_layer.adaLN_modulation.1")
    rules += linear("final.linear", "final_layer.linear")
    return rules


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed original SD3 keys. The head width shows only through QK-norm scales
    (`head_dim`, else 64 as in every release, without them) and sample_size not at all (SD3's 128 is assumed:
    :func:`check_original` tells when the stored position table says otherwise)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks."))
    kernel = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    width, in_channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    if head_dim is None:
        head_dim = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else HEAD_DIM
    if width % head_dim:
        raise ValueError(f"the model width {width} is not a multiple of head_dim={head_dim}: pass head_dim")
    dual = sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})
    return MMDiTConfig(
        in_channels=in_channels, out_channels=_out_channels(sd["final_layer.linear.weight"].shape[0] // patch**2,
                                                            in_channels),
        patch_size=patch, depth=depth, num_heads=width // head_dim, head_dim=head_dim,
        context_dim=sd["context_embedder.weight"].shape[1], pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
        sample_size=SAMPLE_SIZE, pos_embed_max_size=math.isqrt(sd["pos_embed"].shape[1]), qk_norm=qk_norm,
        dual_attention_layers=dual,
        **{**FIXED, "mlp_ratio": sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / width},
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the stored position table is not the one `cfg` computes (wrong sample_size or patch)."""
    stored = sd["pos_embed"].float()
    ours = _pos_embed(cfg)
    if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=1e-2):  # bf16-stored tables
        raise ValueError(f"the checkpoint's pos_embed {tuple(stored.shape)} is not the sin-cos table of "
                         f"sample_size={cfg.sample_size}, pos_embed_max_size={cfg.pos_embed_max_size}; pass the "
                         "model's sample_size (latent side at its training resolution)")
