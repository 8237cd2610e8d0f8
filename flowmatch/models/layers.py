"""Transformer blocks of the MMDiT: joint (two-stream) blocks as in SD3 and single-stream blocks as in FLUX.

Layout conventions used throughout:
- token tensors are (B, S, D) and per-head tensors (B, S, H, head_dim); attention receives transposed views, so
  the (B, H, S, head_dim) tensors that SDPA wants are never materialised and its output reshapes back for free;
- the joint sequence is [image tokens, text tokens];
- adaLN modulation vectors come out of one linear layer per stream in the order
  (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp), each (B, 1, D), followed in MMDiT-X blocks
  by (shift_attn2, scale_attn2, gate_attn2) for the second, image-only attention (SD3.5-medium).

The two-layer MLP (fc1 -> act -> fc2, the names the converter maps) and `RmsNorm` for QK-norm
(x * rsqrt(mean(x^2) + eps) * weight, the operation order of diffusers' RMSNorm, equal to it in float32) come from
:mod:`flowmatch.models.mlp` (timm's layers computed alike; that module says why they are not timm's own).
Written here are the pieces timm has no equivalent of: adaLN modulation, the joint two-stream attention with
MMDiT-X's optional image-only attention, and the single-stream block with its fused input projection.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flowmatch.models.embeddings import RopeTable, apply_rope
from flowmatch.models.flux2 import GatedMlp, SiluGate
from flowmatch.models.key_padding import AttentionMask
from flowmatch.models.mlp import Mlp, RmsNorm

#: The MLP activation of SD3 and FLUX: tanh-approximated GELU.
GELU_TANH = partial(nn.GELU, approximate="tanh")


class AdaLNModulation(nn.Module):
    """SiLU + linear map of the conditioning vector to `chunks` modulation vectors: (B, in_dim) -> chunks x
    (B, 1, D); ``in_dim`` None = D."""

    def __init__(self, dim: int, chunks: int, *, in_dim: Optional[int] = None, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(in_dim or dim, chunks * dim, bias=bias, device=device, dtype=dtype)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


class GivenModulation(nn.Module):
    """Modulation vectors handed in from outside (the modulation approximator's, Chroma) instead of computed from
    the conditioning vector: rows [start, start + chunks) of a (B, K, D) stack -> chunks x (B, 1, D). No weights."""

    def __init__(self, chunks: int, start: int = 0) -> None:
        super().__init__()
        self.chunks, self.start = chunks, start

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return vec[:, self.start:self.start + self.chunks, None].unbind(dim=1)


def modulation(dim: int, chunks: int, *, given: bool, start: int = 0, bias: bool = True, device=None,
               dtype=None) -> nn.Module:
    """A block's modulation: its own adaLN linear, or, when ``given``, rows ``start``.. of a stack from outside."""
    return GivenModulation(chunks, start) if given else AdaLNModulation(dim, chunks, bias=bias, device=device,
                                                                         dtype=dtype)


def init_linears_and_norms(model: nn.Module) -> None:
    """The start of every transformer's ``init_weights``: Xavier-uniform weights and zero biases for each
    ``nn.Linear``, unit scales for each RMS norm, in ``model.modules()`` order (the order of the random draws);
    the model then re-initialises its embedders and zeroes its modulation and output layers."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RmsNorm, nn.RMSNorm)):
            module.reset_parameters()


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """Parameter-free LayerNorm then adaLN: LN(x) * (1 + scale) + shift; x (B, S, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Multi-head attention through SDPA, or FlexAttention when ``mask`` is a ``BlockMask``.

    q: (B, Sq, H, hd), k/v: (B, Sk, H, hd), mask: None, (B, 1, 1, Sk) bool (True = attend) or a BlockMask of
    (B, 1, Sq, Sk) (:func:`flowmatch.models.key_padding.key_padding_mask` makes either) -> (B, Sq, H * hd).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, hd) views
    if isinstance(mask, BlockMask):
        out = flex_attention(q, k, v, block_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, optional QK-norm, RoPE and grouped key/value heads:
    x (B, S, D), mask (B, 1, 1, S) bool, a BlockMask or None, rope or None -> (B, S, D).

    MMDiT-X's second attention of the image stream (SD3.5-medium's `attn2`, over image tokens only), and the
    attention of the single-stream families: Z-Image (no biases) and Lumina-Image-2 (no biases, ``kv_heads`` key /
    value heads shared by groups of query heads). The fused projection's rows are queries, then keys, then values.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, qk_norm: bool, eps: float,
                 kv_heads: Optional[int] = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kv_heads = kv_heads or num_heads
        if num_heads % kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, (num_heads + 2 * kv_heads) * head_dim, bias=bias, **kw)
        self.q_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm else None
        self.k_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm else None
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=bias, **kw)

    def forward(self, x: Tensor, mask: AttentionMask = None, rope: Optional[RopeTable] = None) -> Tensor:
        heads = self.qkv(x).unflatten(-1, (-1, self.head_dim))  # (B, S, H + 2 KV, hd)
        q, k, v = heads.split([self.num_heads, self.kv_heads, self.kv_heads], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        group = self.num_heads // self.kv_heads
        if group > 1:  # query head h reads key/value head h // group
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        return self.proj(attention(q, k, v, mask))


class StreamWeights(nn.Module):
    """The per-modality weights of a joint block: modulation, fused QKV, QK-norm, output projection and MLP.

    A `pre_only` stream (the text stream of SD3's last joint block) only supplies keys and values: its own
    outputs would be discarded, so it has no query, output projection or MLP, and only shift/scale modulation.
    A `dual` stream (the image stream of an MMDiT-X block) has a second attention, `attn2`, over its own tokens,
    with three more modulation vectors. ``bias`` False drops every linear's bias and ``gated`` makes the MLP
    FLUX.2's SwiGLU (:class:`flowmatch.models.flux2.GatedMlp`).
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, *, qk_norm: bool, eps: float,
        pre_only: bool = False, dual: bool = False, given_mod: bool = False, mod_start: int = 0, bias: bool = True,
        gated: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        if pre_only and dual:
            raise ValueError("a context-pre-only stream cannot have a second attention")
        self.num_heads, self.head_dim, self.pre_only = num_heads, head_dim, pre_only
        kw = dict(device=device, dtype=dtype)
        self.mod = modulation(dim, 2 if pre_only else 9 if dual else 6, given=given_mod, start=mod_start, bias=bias,
                              **kw)
        # One matmul for Q, K and V (K and V only when pre_only): fewer, larger GEMMs than three projections.
        self.qkv = nn.Linear(dim, (2 if pre_only else 3) * dim, bias=bias, **kw)
        self.q_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm and not pre_only else None
        self.k_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm else None
        if not pre_only:
            self.proj = nn.Linear(dim, dim, bias=bias, **kw)
            # Position-wise feed-forward: (B, S, D) -> (B, S, D).
            self.mlp = (GatedMlp(dim, mlp_hidden, bias=bias, **kw) if gated
                        else Mlp(dim, hidden_features=mlp_hidden, act_layer=GELU_TANH, bias=bias, **kw))
        self.attn2 = SelfAttention(dim, num_heads, head_dim, qk_norm=qk_norm, eps=eps, **kw) if dual else None

    def heads(self, x: Tensor) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Modulated tokens (B, S, D) -> q (None when pre_only), k, v each (B, S, H, hd), QK-normalised."""
        parts = self.qkv(x).unflatten(-1, (-1, self.num_heads, self.head_dim)).unbind(dim=2)
        q, k, v = (None, *parts) if self.pre_only else parts
        if self.k_norm is not None:
            k = self.k_norm(k)
            q = self.q_norm(q) if q is not None else None
        return q, k, v


class JointBlock(nn.Module):
    """SD3 MMDiT block: separate weights per stream, one attention over [image, text] tokens; with `dual`, the
    MMDiT-X block of SD3.5-medium, whose image stream adds a self-attention over image tokens alone.

    forward(x (B, N, D), ctx (B, L, D), vec (B, D) or, with given_mod, (B, 12, D) modulation rows,
    mask (B, 1, 1, N + L) bool, a BlockMask or None, rope) ->
    (x (B, N, D), ctx (B, L, D), or None when the text stream is pre-only).
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, *, qk_norm: bool, eps: float,
        context_pre_only: bool = False, dual: bool = False, given_mod: bool = False, bias: bool = True,
        gated: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.context_pre_only = context_pre_only
        kw = dict(qk_norm=qk_norm, eps=eps, given_mod=given_mod, bias=bias, gated=gated, device=device, dtype=dtype)
        self.img = StreamWeights(dim, num_heads, head_dim, mlp_hidden, dual=dual, **kw)
        # given_mod: vec is (B, 6 + 6, D), the image stream's modulation rows then the text stream's
        self.txt = StreamWeights(dim, num_heads, head_dim, mlp_hidden, pre_only=context_pre_only, mod_start=6, **kw)

    def forward(
        self, x: Tensor, ctx: Tensor, vec: Tensor, mask: AttentionMask = None, rope: Optional[RopeTable] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        n = x.shape[1]
        img_mod = self.img.mod(vec)
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = img_mod[:6]
        txt_mod = self.txt.mod(vec)
        q_i, k_i, v_i = self.img.heads(modulate(x, i_shift, i_scale, self.eps))  # (B, N, H, hd)
        # MMDiT-X: the second attention reads the block's input, normalised with its own shift and scale.
        x2 = modulate(x, img_mod[6], img_mod[7], self.eps) if self.img.attn2 is not None else None
        q_t, k_t, v_t = self.txt.heads(modulate(ctx, txt_mod[0], txt_mod[1], self.eps))  # (B, L, H, hd)
        # Pre-only: text queries would only produce discarded outputs, so only image tokens query.
        q = q_i if q_t is None else torch.cat([q_i, q_t], dim=1)
        k = torch.cat([k_i, k_t], dim=1)
        v = torch.cat([v_i, v_t], dim=1)
        if rope is not None:
            q, k = apply_rope(q, rope.head(q.shape[1])), apply_rope(k, rope)
        out = attention(q, k, v, mask)  # (B, Sq, D)

        x = torch.addcmul(x, i_gate, self.img.proj(out[:, :n]))
        if x2 is not None:
            x = torch.addcmul(x, img_mod[8], self.img.attn2(x2))
        x = torch.addcmul(x, i_gate2, self.img.mlp(modulate(x, i_shift2, i_scale2, self.eps)))
        if self.context_pre_only:
            return x, None
        _, _, t_gate, t_shift2, t_scale2, t_gate2 = txt_mod
        ctx = torch.addcmul(ctx, t_gate, self.txt.proj(out[:, n:]))
        ctx = torch.addcmul(ctx, t_gate2, self.txt.mlp(modulate(ctx, t_shift2, t_scale2, self.eps)))
        return x, ctx


class SingleBlock(nn.Module):
    """FLUX single-stream block: shared weights over the joint sequence, attention and MLP computed in parallel
    from one input projection and merged by one output projection; ``gated``: FLUX.2's, whose MLP part of the
    input projection is 2 * mlp_hidden wide, gated by SwiGLU.

    forward(h (B, S, D), vec (B, D), or (B, 3, D) with given_mod, mask (B, 1, 1, S), a BlockMask or None, rope)
    -> (B, S, D)
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, *, qk_norm: bool, eps: float,
        given_mod: bool = False, bias: bool = True, gated: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim, self.eps = dim, num_heads, head_dim, eps
        self.mlp_hidden = mlp_hidden
        self.mlp_in = 2 * mlp_hidden if gated else mlp_hidden  # the MLP's share of linear_in
        kw = dict(device=device, dtype=dtype)
        self.mod = modulation(dim, 3, given=given_mod, bias=bias, **kw)
        self.linear_in = nn.Linear(dim, 3 * dim + self.mlp_in, bias=bias, **kw)
        self.linear_out = nn.Linear(dim + mlp_hidden, dim, bias=bias, **kw)
        self.q_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm else None
        self.k_norm = RmsNorm(head_dim, eps=eps, **kw) if qk_norm else None
        self.mlp_act = SiluGate() if gated else GELU_TANH()

    def forward(
        self, h: Tensor, vec: Tensor, mask: AttentionMask = None, rope: Optional[RopeTable] = None
    ) -> Tensor:
        shift, scale, gate = self.mod(vec)
        qkv, mlp = self.linear_in(modulate(h, shift, scale, self.eps)).split([3 * self.dim, self.mlp_in], -1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(dim=2)  # (B, S, H, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = torch.cat([attention(q, k, v, mask), self.mlp_act(mlp)], dim=-1)
        return torch.addcmul(h, gate, self.linear_out(out))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of image tokens to patch pixels: (B, N, D) -> (B, N, p * p * C_out);
    vec (B, D), or the (B, 2, D) shift and scale with given_mod."""

    def __init__(self, dim: int, out_features: int, *, eps: float, given_mod: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.mod = modulation(dim, 2, given=given_mod, bias=bias, device=device, dtype=dtype)
        self.linear = nn.Linear(dim, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.mod(vec)
        return self.linear(modulate(x, shift, scale, self.eps))
