"""FLUX.1 dev and schnell: diffusers' `FluxTransformer2DModel` and Black Forest Labs' original keys
(`double_blocks.*`, `single_blocks.*`, as flux1-dev.safetensors and ComfyUI store them) against flowmatch's MMDiT.

Same inputs give the same outputs: our `model(x, t, Conditioning(hidden, mask, pooled, {"guidance": g}))` on
16-channel latents x (B, 16, H, W) equals diffusers'
`model(pack(x), hidden, pooled, timestep=t, img_ids, txt_ids, guidance=g)` unpacked, where `pack` is
`FluxPipeline._pack_latents` (2x2 patches as (C, p_row, p_col) features), img_ids are (0, row, column) of the packed
grid and txt_ids zeros (both models multiply t and g by 1000). Their sequence is [text, image], ours
[image, text]: attention does not depend on the order.

    flowmatch                        diffusers                                   BFL original
    patch_embed ((pr, pc, C) cols)   x_embedder ((C, pr, pc) columns)            img_in
    time_embed.mlp.fc1 / fc2         time_text_embed.timestep_embedder.linear_1/2 time_in.in_layer / out_layer
    guidance_embed.mlp.fc1 / fc2     time_text_embed.guidance_embedder.*         guidance_in.*
    pooled_embed.fc1 / fc2           time_text_embed.text_embedder.*             vector_in.*
    context_embed                    context_embedder                            txt_in
    joint_blocks.i.img.mod.linear    transformer_blocks.i.norm1.linear           double_blocks.i.img_mod.lin
      .img.qkv                       .attn.to_q | to_k | to_v (stacked)          .img_attn.qkv
      .img.q_norm / k_norm           .attn.norm_q / norm_k                       .img_attn.norm.query_norm/key_norm
      .img.proj, .img.mlp.fc1 / fc2  .attn.to_out.0, .ff.net.0.proj / .ff.net.2  .img_attn.proj, .img_mlp.0 / 2
      .txt.* (as .img)               .norm1_context, .attn.add_*_proj, ...       .txt_mod, .txt_attn.*, .txt_mlp
    single_blocks.i.mod.linear       single_transformer_blocks.i.norm.linear     single_blocks.i.modulation.lin
      .linear_in                     .attn.to_q | to_k | to_v | .proj_mlp         .linear1
      .q_norm / k_norm, .linear_out  .attn.norm_q / norm_k, .proj_out             .norm.query_norm/key_norm, .linear2
    final.mod.linear (shift, scale)  norm_out.linear (scale, shift)              final_layer.adaLN_modulation.1
    final.linear ((pr, pc, C) rows)  proj_out ((C, pr, pc) rows)                 final_layer.linear

QK-norm weights are `.scale` in the original keys; diffusers' text stream is norm1_context, add_q/k/v_proj,
norm_added_q/k, to_add_out and ff_context.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.mmdit import TIME_SCALE
from flowmatch.models.convert.keymap import Copy, Packed, Rule, Stack, SwapHalves, linear, mlp, norm
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "FluxTransformer2DModel"
#: BFL's releases store the transformer's keys without a prefix (ComfyUI's own saves add model.diffusion_model.).
ORIGINAL_PREFIX = ""
#: FLUX packs 2x2 latent patches into the transformer's input features (FluxPipeline._pack_latents).
PACK = 2
#: Fixed hyperparameters of FLUX's transformer that MMDiTConfig exposes as fields.
FIXED = dict(patch_size=PACK, mlp_ratio=4.0, time_freq_dim=256, norm_eps=1e-6, time_scale=TIME_SCALE, rope=True,
             rope_theta=10000.0, qk_norm=True, dual_attention_layers=[], modulation="adaln")
#: RoPE channels per position axis (image index, row, column) of FLUX.1's 128-channel heads.
AXES_DIM = [16, 56, 56]


def is_original(keys) -> bool:
    """Whether un-prefixed original keys are FLUX's (double blocks with their own modulation: Chroma's have
    none)."""
    return "double_blocks.0.img_attn.qkv.weight" in keys and "double_blocks.0.img_mod.lin.weight" in keys


def packed_fields(dcfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The MMDiTConfig fields a FLUX-layout diffusers config (FLUX.1, Chroma) gives alike: 2x2-packed channels,
    block counts, heads and 3-axis RoPE; ValueError naming ``name`` for the variants we do not implement."""
    packed = PACK * PACK
    if dcfg.get("patch_size", 1) != 1 or dcfg["in_channels"] % packed:
        raise ValueError(f"{name} transformers with patch_size={dcfg.get('patch_size')} or in_channels="
                         f"{dcfg['in_channels']} (not 2x2-packed latents) are not supported")
    if dcfg["num_single_layers"] < 1:
        raise ValueError(f"{name} transformers without single-stream blocks are not supported")
    axes = list(dcfg.get("axes_dims_rope") or AXES_DIM)
    if len(axes) != 3 or sum(axes) != dcfg["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope={axes} must be three sizes summing to attention_head_dim")
    out = (dcfg.get("out_channels") or dcfg["in_channels"]) // packed
    return dict(
        in_channels=dcfg["in_channels"] // packed, out_channels=None if out * packed == dcfg["in_channels"] else out,
        depth=dcfg["num_layers"], single_blocks=dcfg["num_single_layers"],
        num_heads=dcfg["num_attention_heads"], head_dim=dcfg["attention_head_dim"],
        context_dim=dcfg["joint_attention_dim"], rope_axes_dim=axes, **FIXED)


def packed_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The diffusers config fields a FLUX-layout transformer (FLUX.1, Chroma, FLUX.2) takes alike from our config,
    the inverse of :func:`packed_fields`: 2x2-packed channels (out_channels None when it equals in_channels, as the
    releases state it), block counts, heads, text width and RoPE axes."""
    packed = PACK * PACK
    out = cfg.out_channels or cfg.in_channels
    return dict(patch_size=1, in_channels=cfg.in_channels * packed,
                out_channels=None if out == cfg.in_channels else out * packed,
                num_layers=cfg.depth, num_single_layers=cfg.single_blocks, attention_head_dim=cfg.head_dim,
                num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
                axes_dims_rope=tuple(cfg.axes_dim))


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `FluxTransformer2DModel` config; ValueError for variants we do not implement."""
    return MMDiTConfig(**packed_fields(dcfg, "FLUX"), pooled_dim=dcfg["pooled_projection_dim"],
                       guidance_embed=bool(dcfg.get("guidance_embeds")))


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `FluxTransformer2DModel` config of our config; ValueError for options diffusers' FLUX does not have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if len(cfg.axes_dim) != 3 or sum(cfg.axes_dim) != cfg.head_dim:
        wrong["rope_axes_dim"] = cfg.rope_axes_dim
    if cfg.single_blocks < 1:
        wrong["single_blocks"] = cfg.single_blocks
    if wrong:
        raise ValueError(f"diffusers' FLUX transformer requires {FIXED}, three RoPE axes summing to head_dim and "
                         f"single blocks; this model has {wrong}")
    return dict(packed_config(cfg), pooled_projection_dim=cfg.pooled_dim, guidance_embeds=cfg.guidance_embed)


def _embedders(cfg: MMDiTConfig, names: dict[str, str], layers: tuple[str, str]) -> list[Rule]:
    """The timestep, guidance (FLUX-dev only) and pooled-text MLPs."""
    return [rule for ours, theirs in names.items() if ours != "guidance_embed.mlp" or cfg.guidance_embed
            for rule in mlp(ours, theirs, layers)]


def _own_modulation(cfg: MMDiTConfig) -> bool:
    """Whether the blocks have their own modulation linears and the model its timestep and pooled-text embedders
    (else the modulation approximator gives them: Chroma, whose tables add its keys to these)."""
    return cfg.modulation == "adaln"


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    d, c_in = cfg.width, cfg.in_channels
    c_out = cfg.out_channels or cfg.in_channels
    own = _own_modulation(cfg)
    rules = linear("patch_embed", "x_embedder", op=Packed(PACK, c_in, axis=1), bias_op=Copy())
    if own:
        rules += _embedders(cfg, {"time_embed.mlp": "time_text_embed.timestep_embedder",
                                  "guidance_embed.mlp": "time_text_embed.guidance_embedder",
                                  "pooled_embed": "time_text_embed.text_embedder"}, ("linear_1", "linear_2"))
    rules += linear("context_embed", "context_embedder")
    qkv = Stack((d, d, d))
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, proj, out, ff, nq, nk in (
            ("img", "norm1", "to_", "to_out.0", "ff", "norm_q", "norm_k"),
            ("txt", "norm1_context", "add_", "to_add_out", "ff_context", "norm_added_q", "norm_added_k"),
        ):
            names = [f"{theirs}.attn.{proj}{x}" + ("_proj" if stream == "txt" else "") for x in "qkv"]
            rules += linear(f"{ours}.{stream}.mod.linear", f"{theirs}.{mod}.linear") if own else []
            rules += linear(f"{ours}.{stream}.qkv", *names, op=qkv)
            rules += [norm(f"{ours}.{stream}.q_norm", f"{theirs}.attn.{nq}.weight"),
                      norm(f"{ours}.{stream}.k_norm", f"{theirs}.attn.{nk}.weight")]
            rules += linear(f"{ours}.{stream}.proj", f"{theirs}.attn.{out}")
            rules += mlp(f"{ours}.{stream}.mlp", f"{theirs}.{ff}.net", ("0.proj", "2"))
    fused = Stack((d, d, d, cfg.mlp_hidden))
    for i in range(cfg.single_blocks):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rules += linear(f"{ours}.mod.linear", f"{theirs}.norm.linear") if own else []
        rules += linear(f"{ours}.linear_in", *(f"{theirs}.attn.to_{x}" for x in "qkv"), f"{theirs}.proj_mlp", op=fused)
        rules += [norm(f"{ours}.q_norm", f"{theirs}.attn.norm_q.weight"),
                  norm(f"{ours}.k_norm", f"{theirs}.attn.norm_k.weight")]
        rules += linear(f"{ours}.linear_out", f"{theirs}.proj_out")
    rules += linear("final.mod.linear", "norm_out.linear", op=SwapHalves()) if own else []
    rules += linear("final.linear", "proj_out", op=Packed(PACK, c_out, axis=0))
    return rules


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    c_in = cfg.in_channels
    c_out = cfg.out_channels or cfg.in_channels
    own = _own_modulation(cfg)
    rules = linear("patch_embed", "img_in", op=Packed(PACK, c_in, axis=1), bias_op=Copy())
    if own:
        rules += _embedders(cfg, {"time_embed.mlp": "time_in", "guidance_embed.mlp": "guidance_in",
                                  "pooled_embed": "vector_in"}, ("in_layer", "out_layer"))
    rules += linear("context_embed", "txt_in")
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", f"double_blocks.{i}"
        for stream in ("img", "txt"):
            rules += linear(f"{ours}.{stream}.mod.linear", f"{theirs}.{stream}_mod.lin") if own else []
            rules += linear(f"{ours}.{stream}.qkv", f"{theirs}.{stream}_attn.qkv")
            rules += [norm(f"{ours}.{stream}.q_norm", f"{theirs}.{stream}_attn.norm.query_norm.scale"),
                      norm(f"{ours}.{stream}.k_norm", f"{theirs}.{stream}_attn.norm.key_norm.scale")]
            rules += linear(f"{ours}.{stream}.proj", f"{theirs}.{stream}_attn.proj")
            rules += mlp(f"{ours}.{stream}.mlp", f"{theirs}.{stream}_mlp", ("0", "2"))
    for i in range(cfg.single_blocks):
        ours, theirs = f"single_blocks.{i}", f"single_blocks.{i}"
        rules += linear(f"{ours}.mod.linear", f"{theirs}.modulation.lin") if own else []
        rules += linear(f"{ours}.linear_in", f"{theirs}.linear1")
        rules += [norm(f"{ours}.q_norm", f"{theirs}.norm.query_norm.scale"),
                  norm(f"{ours}.k_norm", f"{theirs}.norm.key_norm.scale")]
        rules += linear(f"{ours}.linear_out", f"{theirs}.linear2")
    rules += linear("final.mod.linear", "final_layer.adaLN_modulation.1") if own else []
    rules += linear("final.linear", "final_layer.linear", op=Packed(PACK, c_out, axis=0))
    return rules


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed BFL keys. The RoPE split is not stored: FLUX.1's (16, 56, 56) is
    taken for 128-channel heads; other head widths need `rope_axes_dim` given."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("double_blocks."))
    singles = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_blocks."))
    img_in = sd["img_in.weight"]  # (D, 4 C)
    width, packed = img_in.shape[0], PACK * PACK
    out = sd["final_layer.linear.weight"].shape[0] // packed
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]  # FLUX always has QK-norm
    return MMDiTConfig(
        in_channels=img_in.shape[1] // packed, out_channels=None if out == img_in.shape[1] // packed else out,
        depth=depth, single_blocks=singles, num_heads=width // head_dim, head_dim=head_dim,
        context_dim=sd["txt_in.weight"].shape[1], pooled_dim=sd["vector_in.in_layer.weight"].shape[1],
        guidance_embed="guidance_in.in_layer.weight" in sd, rope_axes_dim=list(AXES_DIM) if head_dim == 128 else None,
        **{**FIXED, "mlp_ratio": sd["double_blocks.0.img_mlp.0.weight"].shape[0] / width},
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the RoPE split, which the original keys do not store, is unknown for these heads."""
    if not (cfg.rope_axes_dim and len(cfg.rope_axes_dim) == 3):
        raise ValueError(f"FLUX heads of {cfg.head_dim} channels: pass rope_axes_dim (three sizes, image index, "
                         "rows, columns) as the model was trained; FLUX.1 uses (16, 56, 56) for 128")
