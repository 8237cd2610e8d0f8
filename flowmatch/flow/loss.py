"""The flow-matching regression loss: mean squared error between predicted and target velocity.

With t drawn from a density pi(t), the expected loss is the integral of pi(t) * w(t) * E||v_pred - v||^2, so a
per-t weight w and a non-uniform time distribution are two ways to write the same objective (SD3 paper,
section 3.1). ``loss_weighting = "none"`` with a logit-normal time distribution is the paper's best setting; the
named weightings below let a recipe draw t uniformly and weight by a density instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LOSS_WEIGHTINGS", "LossOutput", "flow_matching_loss", "loss_weight"]


def _no_weight(t: Tensor, logit_mean: float, logit_std: float) -> Tensor:
    return torch.ones_like(t)


def _logit_normal_density(t: Tensor, logit_mean: float, logit_std: float) -> Tensor:
    # Density of sigmoid(N(m, s^2)) at t: N(logit t; m, s) / (t (1 - t)). Clamped away from 0 and 1, where it
    # tends to 0 but the formula is 0/0.
    t = t.clamp(1e-6, 1 - 1e-6)
    z = (torch.log(t) - torch.log1p(-t) - logit_mean) / logit_std
    return torch.exp(-0.5 * z**2) / (logit_std * math.sqrt(2 * math.pi) * t * (1 - t))


def _cosmap_density(t: Tensor, logit_mean: float, logit_std: float) -> Tensor:
    # Density of the SD3 paper's CosMap time distribution: 2 / (pi (1 - 2t + 2t^2)); integrates to 1 on [0, 1].
    return 2.0 / (math.pi * (1 - 2 * t + 2 * t**2))


LOSS_WEIGHTINGS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "none": _no_weight,
    "logit_normal": _logit_normal_density,
    "cosmap": _cosmap_density,
}
"""Per-t loss weights w(t), by recipe name. Each maps t (B,) -> (B,); the logit-normal one reads (m, s)."""


def loss_weight(t: Tensor, weighting: str = "none", *, logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """The weight w(t) of the named scheme for times ``t`` (B,) -> (B,) float32."""
    try:
        fn = LOSS_WEIGHTINGS[weighting]
    except KeyError:
        raise ValueError(
            f"unknown loss weighting {weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}"
        ) from None
    return fn(t.float(), logit_mean, logit_std)


@dataclass
class LossOutput:
    """Result of :func:`flow_matching_loss`."""

    loss: Tensor
    """() scalar to backpropagate: mean of ``per_sample``."""
    per_sample: Tensor
    """(B,) weighted squared error of each example, averaged over its elements (for logging loss against t)."""


def flow_matching_loss(
    velocity_pred: Tensor,
    target: Tensor,
    t: Tensor,
    weighting: str = "none",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> LossOutput:
    """Weighted MSE between ``velocity_pred`` and ``target`` (both (B, ...)) at times ``t`` (B,).

    The error is computed in float32 whatever the model's dtype, so bf16 outputs do not lose the small residuals
    late in training. ``weighting`` names an entry of :data:`LOSS_WEIGHTINGS`; ``logit_mean``/``logit_std`` are
    used by the ``logit_normal`` weighting only. :meth:`flowmatch.flow.TimeSchedule.loss` passes the recipe's
    values for you.
    """
    if velocity_pred.shape != target.shape:
        raise ValueError(
            f"velocity_pred and target must have the same shape; got {tuple(velocity_pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if t.ndim != 1 or t.shape[0] != target.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({target.shape[0]},); got {tuple(t.shape)}")
    err = (velocity_pred.float() - target.float()).pow(2)
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if weighting != "none":
        per_sample = per_sample * loss_weight(t, weighting, logit_mean=logit_mean, logit_std=logit_std)
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample)
