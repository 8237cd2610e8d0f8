"""Qwen-Image: diffusers' `QwenImageTransformer2DModel` against flowmatch's MMDiT (its family is registered in
:mod:`flowmatch.families.qwen_image`).

Same inputs give the same outputs: our `model(x, t, Conditioning(hidden, mask, pooled (B, 0)))` on 16-channel
latents x (B, 16, H, W) equals diffusers' `model(pack(x), hidden, mask, timestep=t, img_shapes=[[(1, H/2, W/2)]])`
unpacked, where `pack` is `QwenImagePipeline._pack_latents` (2x2 patches as (C, p_row, p_col) features, as FLUX
packs them). Both embed t * 1000. Their joint sequence is [text, image], ours [image, text]: attention does not
depend on the order, and each token keeps its MSRoPE angles (:func:`flowmatch.models.embeddings.msrope_table`).

    flowmatch                        diffusers
    patch_embed ((pr, pc, C) cols)   img_in ((C, pr, pc) columns)
    time_embed.mlp.fc1 / fc2         time_text_embed.timestep_embedder.linear_1 / linear_2
    context_norm                     txt_norm
    context_embed                    txt_in
    joint_blocks.i.img.mod.linear    transformer_blocks.i.img_mod.1
      .img.qkv                       .attn.to_q | to_k | to_v (stacked)
      .img.q_norm / k_norm           .attn.norm_q / norm_k
      .img.proj, .img.mlp.fc1 / fc2  .attn.to_out.0, .img_mlp.net.0.proj / .img_mlp.net.2
      .txt.mod.linear                .txt_mod.1
      .txt.qkv, q_norm / k_norm      .attn.add_q_proj | add_k_proj | add_v_proj, .attn.norm_added_q / norm_added_k
      .txt.proj, .txt.mlp            .attn.to_add_out, .txt_mlp.net.0.proj / .txt_mlp.net.2
    final.mod.linear (shift, scale)  norm_out.linear (scale, shift)
    final.linear ((pr, pc, C) rows)  proj_out ((C, pr, pc) rows)

Both halves of the modulation are (shift, scale, gate), as ours. The release is published in diffusers' layout
only; single-file saves (ComfyUI's) keep these same names under ``model.diffusion_model.``, so the original key
table is diffusers' own.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.mmdit import TIME_SCALE
from flowmatch.models.convert.keymap import Copy, Packed, Rule, Stack, SwapHalves, linear, mlp, norm
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "QwenImageTransformer2DModel"
#: ComfyUI's single-file saves of Qwen-Image prefix the transformer's (diffusers-named) keys so.
ORIGINAL_PREFIX = "model.diffusion_model."
#: The pipeline packs 2x2 latent patches into the transformer's input features (QwenImagePipeline._pack_latents).
PACK = 2
#: Fixed hyperparameters of Qwen-Image's transformer that MMDiTConfig exposes as fields.
FIXED = dict(patch_size=PACK, mlp_ratio=4.0, time_freq_dim=256, norm_eps=1e-6, time_scale=TIME_SCALE, rope=True,
             rope_layout="msrope", rope_theta=10000.0, qk_norm=True, dual_attention_layers=[], single_blocks=0,
             pooled_dim=0, context_norm=True, text_last_block=True, guidance_embed=False, time_scale_last=True)
#: Options of diffusers' class that the Qwen-Image editing releases set (per-token modulation of reference
#: tokens, an extra time condition, layered RoPE); their defaults are plain Qwen-Image.
UNSUPPORTED = dict(zero_cond_t=False, use_additional_t_cond=False, use_layer3d_rope=False, guidance_embeds=False)


def is_original(keys) -> bool:
    """Whether un-prefixed single-file keys are Qwen-Image's."""
    return "transformer_blocks.0.img_mod.1.weight" in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `QwenImageTransformer2DModel` config; ValueError for variants we do not
    implement."""
    packed = PACK * PACK
    wrong = {k: dcfg.get(k) for k, v in UNSUPPORTED.items() if bool(dcfg.get(k, v)) != v}
    if dcfg.get("patch_size", PACK) != PACK or dcfg["in_channels"] % packed:
        wrong.update(patch_size=dcfg.get("patch_size"), in_channels=dcfg["in_channels"])
    axes = list(dcfg.get("axes_dims_rope") or (16, 56, 56))
    if len(axes) != 3 or sum(axes) != dcfg["attention_head_dim"]:
        wrong["axes_dims_rope"] = axes
    if wrong:
        raise ValueError(f"Qwen-Image transformers with {wrong} are not supported: flowmatch implements {UNSUPPORTED}, "
                         "patch_size 2 over 2x2-packed latents and three RoPE axes summing to attention_head_dim")
    c_in = dcfg["in_channels"] // packed
    out = dcfg.get("out_channels") or c_in
    return MMDiTConfig(
        in_channels=c_in, out_channels=None if out == c_in else out, depth=dcfg["num_layers"],
        num_heads=dcfg["num_attention_heads"], head_dim=dcfg["attention_head_dim"],
        context_dim=dcfg["joint_attention_dim"], rope_axes_dim=axes, **FIXED,
    )


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `QwenImageTransformer2DModel` config of our config; ValueError for options diffusers' class does not
    have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if len(cfg.axes_dim) != 3 or sum(cfg.axes_dim) != cfg.head_dim:
        wrong["rope_axes_dim"] = cfg.rope_axes_dim
    if wrong:
        raise ValueError(f"diffusers' Qwen-Image transformer requires {FIXED} and three RoPE axes summing to "
                         f"head_dim; this model has {wrong}")
    return dict(  # out_channels is stated in latent channels (16), in_channels in packed features (64)
        patch_size=PACK, in_channels=cfg.in_channels * PACK * PACK, out_channels=cfg.out_channels or cfg.in_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim, axes_dims_rope=tuple(cfg.axes_dim), **UNSUPPORTED,
    )


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    d = cfg.width
    c_out = cfg.out_channels or cfg.in_channels
    rules = linear("patch_embed", "img_in", op=Packed(PACK, cfg.in_channels, axis=1), bias_op=Copy())
    rules += mlp("time_embed.mlp", "time_text_embed.timestep_embedder", ("linear_1", "linear_2"))
    rules += [norm("context_norm", "txt_norm.weight")]
    rules += linear("context_embed", "txt_in")
    qkv = Stack((d, d, d))
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        for stream, proj, out, nq, nk in (("img", "to_{}", "to_out.0", "norm_q", "norm_k"),
                                          ("txt", "add_{}_proj", "to_add_out", "norm_added_q", "norm_added_k")):
            rules += linear(f"{ours}.{stream}.mod.linear", f"{theirs}.{stream}_mod.1")
            rules += linear(f"{ours}.{stream}.qkv", *(f"{theirs}.attn.{proj.format(x)}" for x in "qkv"), op=qkv)
            rules += [norm(f"{ours}.{stream}.q_norm", f"{theirs}.attn.{nq}.weight"),
                      norm(f"{ours}.{stream}.k_norm", f"{theirs}.attn.{nk}.weight")]
            rules += linear(f"{ours}.{stream}.proj", f"{theirs}.attn.{out}")
            rules += mlp(f"{ours}.{stream}.mlp", f"{theirs}.{stream}_mlp.net", ("0.proj", "2"))
    rules += linear("final.mod.linear", "norm_out.linear", op=SwapHalves())
    rules += linear("final.linear", "proj_out", op=Packed(PACK, c_out, axis=0))
    return rules


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    """Single-file saves use diffusers' names (un-prefixed)."""
    return diffusers_rules(cfg)


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed single-file keys. The RoPE split is not stored: Qwen-Image's
    (16, 56, 56) is taken for 128-channel heads; other head widths need `rope_axes_dim` given."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    img_in = sd["img_in.weight"]  # (D, 4 C)
    width, packed = img_in.shape[0], PACK * PACK
    head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    c_in, out = img_in.shape[1] // packed, sd["proj_out.weight"].shape[0] // packed
    return MMDiTConfig(
        in_channels=c_in, out_channels=None if out == c_in else out, depth=depth, num_heads=width // head_dim,
        head_dim=head_dim, context_dim=sd["txt_in.weight"].shape[1],
        rope_axes_dim=[16, 56, 56] if head_dim == 128 else None,
        **{**FIXED, "mlp_ratio": sd["transformer_blocks.0.img_mlp.net.0.proj.weight"].shape[0] / width},
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the RoPE split, which the single-file keys do not store, is unknown for these heads."""
    if not (cfg.rope_axes_dim and len(cfg.rope_axes_dim) == 3):
        raise ValueError(f"Qwen-Image heads of {cfg.head_dim} channels: pass rope_axes_dim (three sizes: frame, "
                         "rows, columns) as the model was trained; Qwen-Image uses (16, 56, 56) for 128")
