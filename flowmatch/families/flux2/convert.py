"""FLUX.2: diffusers' `Flux2Transformer2DModel` and Black Forest Labs' original keys (flux2-dev.safetensors,
flux-2-klein-*.safetensors: `double_blocks.*`, `single_blocks.*`, the shared `*_modulation.lin`) against
flowmatch's MMDiT with ``modulation: shared``, ``mlp: swiglu`` and no biases.

Same inputs give the same outputs: our ``model(x, t, Conditioning(hidden, mask, _, {"guidance": g}))`` on
32-channel latents x (B, 32, H, W) equals diffusers' ``model(pack(x), hidden, timestep=t, img_ids, txt_ids,
guidance=g, joint_attention_kwargs={"attention_mask": mask})`` unpacked, where ``pack`` is the pipeline's
``_patchify_latents`` then ``_pack_latents`` (2x2 patches as (C, p_row, p_col) features, as FLUX.1 packs them),
img_ids (0, row, column, 0) and txt_ids (0, 0, 0, n) (:func:`flowmatch.models.embeddings.flux2_rope_table`).
Both embed t * 1000 (and g * 1000). Their sequence is [text, image], ours [image, text]; the pipelines pass no
mask (every text token, padding included, is seen), which is our ``all_valid`` conditioning.

    flowmatch                        diffusers                                BFL original
    patch_embed ((pr, pc, C) cols)   x_embedder ((C, pr, pc) columns)         img_in
    time_embed.mlp.fc1 / fc2         time_guidance_embed.timestep_embedder.*  time_in.in_layer / out_layer
    guidance_embed.mlp.fc1 / fc2     time_guidance_embed.guidance_embedder.*  guidance_in.*
    shared_mod.img / txt             double_stream_modulation_img / _txt      double_stream_modulation_img / _txt
    shared_mod.single                single_stream_modulation                 single_stream_modulation
                                     (.linear)                                (.lin)
    context_embed                    context_embedder                         txt_in
    joint_blocks.i.img.qkv           transformer_blocks.i.attn.to_q|k|v       double_blocks.i.img_attn.qkv
      .img.q_norm / k_norm           .attn.norm_q / norm_k                    .img_attn.norm.query_norm / key_norm
      .img.proj                      .attn.to_out.0                           .img_attn.proj
      .img.mlp.fc1 / fc2             .ff.linear_in / linear_out               .img_mlp.0 / 2
      .txt.* (as .img)               .attn.add_*_proj, norm_added_*,          .txt_attn.*, .txt_mlp.*
                                     to_add_out, .ff_context.*
    single_blocks.i.linear_in        single_transformer_blocks.i.attn         single_blocks.i.linear1
                                     .to_qkv_mlp_proj
      .q_norm / k_norm               .attn.norm_q / norm_k                    .norm.query_norm / key_norm
      .linear_out                    .attn.to_out                             .linear2
    final.mod.linear (shift, scale)  norm_out.linear (scale, shift)           final_layer.adaLN_modulation.1
    final.linear ((pr, pc, C) rows)  proj_out ((C, pr, pc) rows)              final_layer.linear

No tensor has a bias. QK-norm weights are ``.scale`` in the original keys.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.flux.convert import packed_config
from flowmatch.families.mmdit import TIME_SCALE
from flowmatch.models.convert.keymap import Copy, Op, Packed, Rule, Stack, SwapHalves, linear, mlp, norm
from flowmatch.models.mmdit import MMDiTConfig

DIFFUSERS_CLASS = "Flux2Transformer2DModel"
#: BFL's releases store the transformer's keys without a prefix.
ORIGINAL_PREFIX = ""
#: The pipeline packs 2x2 latent patches into the transformer's input features (Flux2Pipeline._patchify_latents).
PACK = 2
#: RoPE channels per position axis (time, row, column, sequence) of FLUX.2's 128-channel heads.
AXES_DIM = [32, 32, 32, 32]
#: Fixed hyperparameters of FLUX.2's transformer that MMDiTConfig exposes as fields (Flux2Transformer2DModel's
#: defaults: mlp_ratio 3, RoPE theta 2000, timestep_guidance_channels 256, eps 1e-6).
FIXED = dict(patch_size=PACK, mlp_ratio=3.0, time_freq_dim=256, norm_eps=1e-6, time_scale=TIME_SCALE, rope=True,
             rope_layout="flux2", rope_theta=2000.0, qk_norm=True, dual_attention_layers=[], modulation="shared",
             bias=False, mlp="swiglu", context_norm=False, time_scale_last=False, text_last_block=False)
#: The key only FLUX.2's original files have.
ORIGINAL_MARK = "double_stream_modulation_img.lin.weight"


def is_original(keys) -> bool:
    """Whether un-prefixed original keys are FLUX.2's."""
    return ORIGINAL_MARK in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `Flux2Transformer2DModel` config; ValueError for variants we do not implement."""
    packed = PACK * PACK
    if dcfg.get("patch_size", 1) != 1 or dcfg["in_channels"] % packed:
        raise ValueError(f"FLUX.2 transformers with patch_size={dcfg.get('patch_size')} or in_channels="
                         f"{dcfg['in_channels']} (not 2x2-packed latents) are not supported")
    if dcfg["num_single_layers"] < 1:
        raise ValueError("FLUX.2 transformers without single-stream blocks are not supported")
    axes = list(dcfg.get("axes_dims_rope") or AXES_DIM)
    if len(axes) != 4 or sum(axes) != dcfg["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope={axes} must be four sizes summing to attention_head_dim")
    out = (dcfg.get("out_channels") or dcfg["in_channels"]) // packed
    fixed = {**FIXED, "mlp_ratio": float(dcfg.get("mlp_ratio", FIXED["mlp_ratio"])),
             "rope_theta": float(dcfg.get("rope_theta", FIXED["rope_theta"])),
             "time_freq_dim": dcfg.get("timestep_guidance_channels", FIXED["time_freq_dim"]),
             "norm_eps": dcfg.get("eps", FIXED["norm_eps"])}
    return MMDiTConfig(
        in_channels=dcfg["in_channels"] // packed, out_channels=None if out * packed == dcfg["in_channels"] else out,
        depth=dcfg["num_layers"], single_blocks=dcfg["num_single_layers"], num_heads=dcfg["num_attention_heads"],
        head_dim=dcfg["attention_head_dim"], context_dim=dcfg["joint_attention_dim"], pooled_dim=0,
        rope_axes_dim=axes, guidance_embed=bool(dcfg.get("guidance_embeds", True)), **fixed)


#: The fields diffusers' class takes as its own (not fixed here).
_FREE = ("mlp_ratio", "rope_theta", "time_freq_dim", "norm_eps")


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `Flux2Transformer2DModel` config of our config; ValueError for options diffusers' FLUX.2 does not
    have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if k not in _FREE and getattr(cfg, k) != v}
    if len(cfg.axes_dim) != 4 or sum(cfg.axes_dim) != cfg.head_dim:
        wrong["rope_axes_dim"] = cfg.rope_axes_dim
    for name in ("pooled_dim", "interval_embed", "references"):
        if getattr(cfg, name):
            wrong[name] = getattr(cfg, name)
    if wrong:
        raise ValueError(f"diffusers' FLUX.2 transformer requires {FIXED}, four RoPE axes summing to head_dim and "
                         f"no pooled vector, interval input or references; this model has {wrong}")
    return dict(
        packed_config(cfg), timestep_guidance_channels=cfg.time_freq_dim, mlp_ratio=cfg.mlp_ratio,
        rope_theta=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        eps=cfg.norm_eps, guidance_embeds=cfg.guidance_embed,
    )


def _weight(ours: str, *theirs: str, op: Op = Copy()) -> list[Rule]:
    return linear(ours, *theirs, op=op, bias=False)


def _rules(cfg: MMDiTConfig, n: Mapping[str, Any]) -> list[Rule]:
    """The key table in one layout; ``n`` names its tensors (:data:`DIFFUSERS_NAMES`, :data:`ORIGINAL_NAMES`)."""
    d, c_in = cfg.width, cfg.in_channels
    c_out = cfg.out_channels or cfg.in_channels
    rules = _weight("patch_embed", n["x"], op=Packed(PACK, c_in, axis=1))
    rules += mlp("time_embed.mlp", n["time"], n["embed_layers"], bias=False)
    rules += mlp("guidance_embed.mlp", n["guidance"], n["embed_layers"], bias=False) if cfg.guidance_embed else []
    for ours in ("img", "txt", "single"):
        rules += _weight(f"shared_mod.{ours}", n[f"mod_{ours}"])
    rules += _weight("context_embed", n["context"])
    for i in range(cfg.depth):
        ours, theirs = f"joint_blocks.{i}", n["double"].format(i)
        for stream in ("img", "txt"):
            s = n[stream]
            qkv = [f"{theirs}.{name}" for name in s["qkv"]]
            rules += _weight(f"{ours}.{stream}.qkv", *qkv, op=Stack((d, d, d)) if len(qkv) == 3 else Copy())
            rules += [norm(f"{ours}.{stream}.q_norm", f"{theirs}.{s['q_norm']}"),
                      norm(f"{ours}.{stream}.k_norm", f"{theirs}.{s['k_norm']}")]
            rules += _weight(f"{ours}.{stream}.proj", f"{theirs}.{s['proj']}")
            rules += mlp(f"{ours}.{stream}.mlp", f"{theirs}.{s['mlp']}", n["mlp_layers"], bias=False)
    for i in range(cfg.single_blocks):
        ours, theirs = f"single_blocks.{i}", n["single"].format(i)
        rules += _weight(f"{ours}.linear_in", f"{theirs}.{n['linear_in']}")
        rules += [norm(f"{ours}.q_norm", f"{theirs}.{n['single_q_norm']}"),
                  norm(f"{ours}.k_norm", f"{theirs}.{n['single_k_norm']}")]
        rules += _weight(f"{ours}.linear_out", f"{theirs}.{n['linear_out']}")
    rules += _weight("final.mod.linear", n["final_mod"], op=n["final_mod_op"])
    rules += _weight("final.linear", n["final"], op=Packed(PACK, c_out, axis=0))
    return rules


#: diffusers' names (Flux2Transformer2DModel).
DIFFUSERS_NAMES = dict(
    x="x_embedder", time="time_guidance_embed.timestep_embedder", guidance="time_guidance_embed.guidance_embedder",
    embed_layers=("linear_1", "linear_2"), mod_img="double_stream_modulation_img.linear",
    mod_txt="double_stream_modulation_txt.linear", mod_single="single_stream_modulation.linear",
    context="context_embedder", double="transformer_blocks.{}", mlp_layers=("linear_in", "linear_out"),
    img=dict(qkv=("attn.to_q", "attn.to_k", "attn.to_v"), q_norm="attn.norm_q.weight", k_norm="attn.norm_k.weight",
             proj="attn.to_out.0", mlp="ff"),
    txt=dict(qkv=("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), q_norm="attn.norm_added_q.weight",
             k_norm="attn.norm_added_k.weight", proj="attn.to_add_out", mlp="ff_context"),
    single="single_transformer_blocks.{}", linear_in="attn.to_qkv_mlp_proj", linear_out="attn.to_out",
    single_q_norm="attn.norm_q.weight", single_k_norm="attn.norm_k.weight",
    final_mod="norm_out.linear", final_mod_op=SwapHalves(), final="proj_out",
)
#: BFL's original names (flux2's model.py, as the released single files store them).
ORIGINAL_NAMES = dict(
    x="img_in", time="time_in", guidance="guidance_in", embed_layers=("in_layer", "out_layer"),
    mod_img="double_stream_modulation_img.lin", mod_txt="double_stream_modulation_txt.lin",
    mod_single="single_stream_modulation.lin", context="txt_in", double="double_blocks.{}", mlp_layers=("0", "2"),
    **{stream: dict(qkv=(f"{stream}_attn.qkv",), q_norm=f"{stream}_attn.norm.query_norm.scale",
                    k_norm=f"{stream}_attn.norm.key_norm.scale", proj=f"{stream}_attn.proj", mlp=f"{stream}_mlp")
       for stream in ("img", "txt")},
    single="single_blocks.{}", linear_in="linear1", linear_out="linear2", single_q_norm="norm.query_norm.scale",
    single_k_norm="norm.key_norm.scale", final_mod="final_layer.adaLN_modulation.1", final_mod_op=Copy(),
    final="final_layer.linear",
)


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    return _rules(cfg, DIFFUSERS_NAMES)


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    return _rules(cfg, ORIGINAL_NAMES)


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed BFL FLUX.2 keys. The RoPE split is not stored: FLUX.2's
    (32, 32, 32, 32) is taken for 128-channel heads, a quarter of the head each otherwise."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("double_blocks."))
    singles = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_blocks."))
    img_in = sd["img_in.weight"]  # (D, 4 C)
    width, packed = img_in.shape[0], PACK * PACK
    out = sd["final_layer.linear.weight"].shape[0] // packed
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return MMDiTConfig(
        in_channels=img_in.shape[1] // packed, out_channels=None if out == img_in.shape[1] // packed else out,
        depth=depth, single_blocks=singles, num_heads=width // head_dim, head_dim=head_dim,
        context_dim=sd["txt_in.weight"].shape[1], pooled_dim=0, guidance_embed="guidance_in.in_layer.weight" in sd,
        rope_axes_dim=[head_dim // 4] * 4,
        **{**FIXED, "mlp_ratio": sd["double_blocks.0.img_mlp.2.weight"].shape[1] / width,
           "time_freq_dim": sd["time_in.in_layer.weight"].shape[1]},
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the RoPE split, which the original keys do not store, is not four axes summing to the
    head (FLUX.2's layout)."""
    if not (cfg.rope_axes_dim and len(cfg.rope_axes_dim) == 4 and sum(cfg.rope_axes_dim) == cfg.head_dim):
        raise ValueError(f"FLUX.2 heads of {cfg.head_dim} channels: pass rope_axes_dim (four sizes: time, rows, "
                         "columns, sequence) as the model was trained; FLUX.2 uses (32, 32, 32, 32) for 128")
