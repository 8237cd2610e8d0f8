"""Z-Image: diffusers' `ZImageTransformer2DModel` and the release's single-file keys (ComfyUI's saves, the
layout diffusers' single-file loader reads) against flowmatch's :class:`flowmatch.models.zimage.ZImage` (its
family is registered in :mod:`flowmatch.families.zimage`).

Same inputs give the same outputs: our ``model(x, t, Conditioning(hidden, mask, _))`` equals the negation of
diffusers' ``model(list(x[:, :, None]), 1 - t, [hidden[i][mask[i]] for i in range(B)])`` stacked, for any masks
(:mod:`flowmatch.models.zimage` pads text as diffusers does per sample).

    flowmatch                         diffusers                             original (single file)
    patch_embed                       all_x_embedder.2-1                    x_embedder
    time_embed.fc1 / fc2              t_embedder.mlp.0 / mlp.2              (the same)
    context_norm / context_embed      cap_embedder.0 / cap_embedder.1       (the same)
    image_pad / text_pad              x_pad_token / cap_pad_token           (the same)
    <blocks>.i.attn.qkv               <blocks>.i.attention.to_q|to_k|to_v   .attention.qkv
      .attn.proj                      .attention.to_out.0                   .attention.out
      .attn.q_norm / k_norm           .attention.norm_q / norm_k            .attention.q_norm / k_norm
      .mlp.w1 / w2 / w3               .feed_forward.w1 / w2 / w3            (the same)
      .norm_attn / norm_attn_out      .attention_norm1 / attention_norm2    (the same)
      .norm_mlp / norm_mlp_out        .ffn_norm1 / ffn_norm2                (the same)
      .modulation                     .adaLN_modulation.0                   (the same)
    final.modulation / final.linear   all_final_layer.2-1.adaLN_modulation.1 / .linear    final_layer.*

where <blocks> is noise_refiner, context_refiner (no modulation) and layers in both.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from flowmatch.families.mmdit import TIME_SCALE
from flowmatch.models.convert.keymap import Copy, Rule, Stack, linear, norm
from flowmatch.models.mmdit import MMDiTConfig
from flowmatch.models.zimage import ROPE_LAYOUT  # the value of rope_layout that tells a Z-Image section apart

DIFFUSERS_CLASS = "ZImageTransformer2DModel"
#: ComfyUI's single files prefix the transformer's keys so.
ORIGINAL_PREFIX = "model.diffusion_model."
#: The one patch size the release has (diffusers' all_patch_size=(2,), all_f_patch_size=(1,)).
PATCH = 2
#: The RoPE table lengths per axis diffusers precomputes (its default axes_lens); flowmatch computes angles
#: directly, so any position works, and writes these back.
AXES_LENS = (1024, 512, 512)
#: Fixed hyperparameters of the release that MMDiTConfig exposes as fields.
FIXED = dict(patch_size=PATCH, mlp_ratio=8 / 3, time_freq_dim=256, time_scale=TIME_SCALE, rope=True,
             rope_layout=ROPE_LAYOUT, qk_norm=True, pooled_dim=0, single_blocks=0, guidance_embed=False)
#: The key only Z-Image's single files have (and diffusers', under other names).
ORIGINAL_MARK = "x_pad_token"


def is_original(keys) -> bool:
    """Whether un-prefixed single-file keys are Z-Image's."""
    return ORIGINAL_MARK in keys and "x_embedder.weight" in keys


def config_from_diffusers(dcfg: Mapping[str, Any]) -> MMDiTConfig:
    """Our config for a diffusers `ZImageTransformer2DModel` config; ValueError for variants we do not implement
    (other patch sizes, the Omni variant's SigLIP input, grouped-query heads diffusers does not build either)."""
    wrong = {}
    if tuple(dcfg.get("all_patch_size", (PATCH,))) != (PATCH,) or tuple(dcfg.get("all_f_patch_size", (1,))) != (1,):
        wrong.update(all_patch_size=dcfg.get("all_patch_size"), all_f_patch_size=dcfg.get("all_f_patch_size"))
    if dcfg.get("siglip_feat_dim") is not None:
        wrong["siglip_feat_dim"] = dcfg["siglip_feat_dim"]
    if not dcfg.get("qk_norm", True):
        wrong["qk_norm"] = False
    if wrong:
        raise ValueError(f"Z-Image transformers with {wrong} are not supported: flowmatch implements patch size 2, "
                         "QK-norm and text-to-image inputs (no SigLIP features)")
    dim, heads = dcfg.get("dim", 3840), dcfg.get("n_heads", 30)
    return MMDiTConfig(
        in_channels=dcfg.get("in_channels", 16), depth=dcfg.get("n_layers", 30),
        refiner_layers=dcfg.get("n_refiner_layers", 2), num_heads=heads, head_dim=dim // heads,
        context_dim=dcfg.get("cap_feat_dim", 2560), norm_eps=dcfg.get("norm_eps", 1e-5),
        rope_theta=float(dcfg.get("rope_theta", 256.0)), rope_axes_dim=list(dcfg.get("axes_dims", [32, 48, 48])),
        **{**FIXED, "time_scale": float(dcfg.get("t_scale", TIME_SCALE))},
    )


def diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The `ZImageTransformer2DModel` config of our config; ValueError for options diffusers' class does not
    have."""
    wrong = {k: getattr(cfg, k) for k, v in FIXED.items() if k != "time_scale" and getattr(cfg, k) != v}
    if cfg.out_channels not in (None, cfg.in_channels):
        wrong["out_channels"] = cfg.out_channels
    if wrong:
        raise ValueError(f"diffusers' Z-Image transformer requires {FIXED} and out_channels = in_channels; this "
                         f"model has {wrong}")
    return dict(
        all_patch_size=(PATCH,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.width,
        n_layers=cfg.depth, n_refiner_layers=cfg.refiner_layers, n_heads=cfg.num_heads, n_kv_heads=cfg.num_heads,
        norm_eps=cfg.norm_eps, qk_norm=True, cap_feat_dim=cfg.context_dim, rope_theta=cfg.rope_theta,
        t_scale=cfg.time_scale, axes_dims=list(cfg.axes_dim), axes_lens=list(AXES_LENS),
    )


def _block_rules(ours: str, theirs: str, *, modulated: bool, width: int, original: bool) -> list[Rule]:
    qkv = (f"{theirs}.attention.qkv.weight",) if original else tuple(
        f"{theirs}.attention.to_{x}.weight" for x in "qkv")
    rules = [Rule(f"{ours}.attn.qkv.weight", qkv, Copy() if original else Stack((width,) * 3))]
    out, qn, kn = (("out", "q_norm", "k_norm") if original else ("to_out.0", "norm_q", "norm_k"))
    rules += [Rule(f"{ours}.attn.proj.weight", (f"{theirs}.attention.{out}.weight",)),
              norm(f"{ours}.attn.q_norm", f"{theirs}.attention.{qn}.weight"),
              norm(f"{ours}.attn.k_norm", f"{theirs}.attention.{kn}.weight")]
    rules += [Rule(f"{ours}.mlp.{w}.weight", (f"{theirs}.feed_forward.{w}.weight",)) for w in ("w1", "w2", "w3")]
    rules += [norm(f"{ours}.{a}", f"{theirs}.{b}.weight") for a, b in (
        ("norm_attn", "attention_norm1"), ("norm_attn_out", "attention_norm2"), ("norm_mlp", "ffn_norm1"),
        ("norm_mlp_out", "ffn_norm2"))]
    if modulated:
        rules += linear(f"{ours}.modulation", f"{theirs}.adaLN_modulation.0")
    return rules


def _rules(cfg: MMDiTConfig, *, original: bool) -> list[Rule]:
    embed, final = ("x_embedder", "final_layer") if original else (f"all_x_embedder.{PATCH}-1",
                                                                    f"all_final_layer.{PATCH}-1")
    rules = linear("patch_embed", embed)
    rules += linear("time_embed.fc1", "t_embedder.mlp.0") + linear("time_embed.fc2", "t_embedder.mlp.2")
    rules += [norm("context_norm", "cap_embedder.0.weight")] + linear("context_embed", "cap_embedder.1")
    rules += [Rule("image_pad", ("x_pad_token",)), Rule("text_pad", ("cap_pad_token",))]
    for blocks, count, modulated in (("noise_refiner", cfg.refiner_layers, True),
                                     ("context_refiner", cfg.refiner_layers, False), ("layers", cfg.depth, True)):
        for i in range(count):
            rules += _block_rules(f"{blocks}.{i}", f"{blocks}.{i}", modulated=modulated, width=cfg.width,
                                  original=original)
    rules += linear("final.modulation", f"{final}.adaLN_modulation.1") + linear("final.linear", f"{final}.linear")
    return rules


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    return _rules(cfg, original=False)


def original_rules(cfg: MMDiTConfig) -> list[Rule]:
    return _rules(cfg, original=True)


def config_from_original(sd: Mapping[str, Tensor], head_dim: Optional[int] = None) -> MMDiTConfig:
    """Our config inferred from un-prefixed single-file keys. The heads are not stored: the release's 128-channel
    heads with its (32, 48, 48) RoPE split are taken unless ``head_dim`` is given (then ``rope_axes_dim`` must be
    given too); nor are ``norm_eps``, ``rope_theta`` and the time scale (the release's are taken)."""
    width, patch_features = sd["x_embedder.weight"].shape
    head_dim = head_dim or sd["layers.0.attention.q_norm.weight"].shape[0]
    def count(name: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"{name}.")), default=-1)

    return MMDiTConfig(
        in_channels=patch_features // (PATCH * PATCH), depth=count("layers"), refiner_layers=count("noise_refiner"),
        num_heads=width // head_dim, head_dim=head_dim, context_dim=sd["cap_embedder.1.weight"].shape[1],
        norm_eps=1e-5, rope_theta=256.0, rope_axes_dim=[32, 48, 48] if head_dim == 128 else None, **FIXED,
    )


def check_original(cfg: MMDiTConfig, sd: Mapping[str, Tensor]) -> None:
    """ValueError when the RoPE split, which the single-file keys do not store, is unknown for these heads."""
    if not (cfg.rope_axes_dim and len(cfg.rope_axes_dim) == 3 and sum(cfg.rope_axes_dim) == cfg.head_dim):
        raise ValueError(f"Z-Image heads of {cfg.head_dim} channels: pass rope_axes_dim (three sizes summing to "
                         "head_dim) as the model was trained; the release uses (32, 48, 48) for 128")
