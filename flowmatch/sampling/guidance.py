"""Classifier-free guidance at sampling: conditional and unconditional velocities from one batched forward.

The unconditional input is the empty caption's encoding, the same one training swaps in with
:func:`flowmatch.flow.drop_captions`, so the unconditional model the sampler asks for is the one training taught
(Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning

__all__ = ["guided_velocity"]


def guided_velocity(
    model_fn: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float | None,
    *,
    r: bool = False,
    renorm: int = 0,
    renorm_rows: bool = False,
) -> Callable[..., Tensor]:
    """A velocity field ``v(x, t)`` with classifier-free guidance, for :func:`flowmatch.sampling.sample_ode`;
    with ``r=True`` an average velocity ``u(x, t, r)`` for :func:`flowmatch.sampling.sample_average`, the model
    called as ``model_fn(x, t, cond, r=r)``.

    Returns ``v_u + scale * (v_c - v_u)`` where ``v_c = model_fn(x, t, cond)`` and ``v_u`` likewise with
    ``uncond``; both come from ONE forward on the batch [x; x] of size 2B (``uncond`` may have batch 1, and
    token lengths may differ: :meth:`Conditioning.cat` pads). ``scale`` None or 1 is plain conditional sampling
    with a single forward of size B; ``uncond`` may then be None. x (B, ...), t (B,).

    ``renorm`` p > 0 rescales the guided velocity of each p x p patch (all channels: one token of a pipeline that
    packs p x p latent patches) to the conditional velocity's norm there, as QwenImagePipeline's true CFG does:
    ``g * ||v_c|| / ||g||``; x is then (B, C, H, W) with H and W multiples of p. ``renorm_rows`` rescales each
    row of (B, C, H, W) velocities (one channel, one latent row, across the width) so, as Lumina2Pipeline's
    cfg_normalization does.
    """
    if scale is None or scale == 1.0:
        if r:
            return lambda x, t, r_: model_fn(x, t, cond, r=r_)
        return lambda x, t: model_fn(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs the unconditional (empty caption) inputs; got uncond=None")
    both = Conditioning.cat([cond, cond.unconditional(uncond)])  # the unconditional pass keeps the references

    def velocity(x: Tensor, t: Tensor, r_: Tensor | None = None) -> Tensor:
        extra = {} if r_ is None else {"r": torch.cat([r_, r_])}
        v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), both, **extra).chunk(2)
        guided = v_uncond + scale * (v_cond - v_uncond)
        if renorm:
            guided = guided * (_patch_norms(v_cond, renorm) / _patch_norms(guided, renorm))
        if renorm_rows:
            guided = guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return guided

    return velocity


def _patch_norms(v: Tensor, p: int) -> Tensor:
    """The L2 norm of each p x p patch of v (B, C, H, W) over its channels and pixels, broadcast back to v's shape."""
    b, c, h, w = v.shape
    patches = v.reshape(b, c, h // p, p, w // p, p)
    norms = patches.square().sum(dim=(1, 3, 5), keepdim=True).sqrt()  # (B, 1, h/p, 1, w/p, 1)
    return norms.expand_as(patches).reshape(b, c, h, w)
