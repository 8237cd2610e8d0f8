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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmatch.errors import choice_error

__all__ = ["HUBER_SCHEDULES", "LOSS_KINDS", "LOSS_WEIGHTINGS", "LossConfig", "LossOutput", "flow_matching_loss",
           "latent_mask", "loss_weight"]

#: The elementwise errors ``flow.loss.kind`` names.
LOSS_KINDS = ("mse", "l1", "pseudo_huber")
#: How the pseudo-Huber delta c moves with t: constant; exponential c(t) = c ** t (1 at the data, c at the noise);
#: snr c(t) = (1 - c) / (1 + t)^2 + c (the delta grows as the noise level falls). Both after the timestep-dependent
#: Huber schedules of Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
#: Pseudo-Huber Loss", written on flowmatch's t (t = 1 noise).
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class LossConfig:
    """The recipe's ``flow.loss`` section: the elementwise error between predicted and target velocity."""

    kind: str = "mse"
    """mse | l1 | pseudo_huber (2 c (sqrt(e^2 + c^2) - c): quadratic below c, linear above, robust to outliers)."""
    huber_c: float = 0.1
    """pseudo_huber: the delta c (at t = 1 under a schedule)."""
    huber_schedule: str = "constant"
    """pseudo_huber: constant | exponential | snr, how c moves with t (see HUBER_SCHEDULES)."""

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise choice_error("flow.loss.kind", self.kind, LOSS_KINDS)
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise choice_error("flow.loss.huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        if not 0.0 < self.huber_c <= 1.0:
            raise ValueError(f"flow.loss.huber_c must be in (0, 1]; got {self.huber_c}")

    def huber_delta(self, t: Tensor) -> Tensor:
        """c(t) of the schedule, t (B,) -> (B,) float32."""
        t, c = t.float(), self.huber_c
        if self.huber_schedule == "exponential":
            return torch.full_like(t, c).pow(t)
        if self.huber_schedule == "snr":
            return (1 - c) / (1 + t) ** 2 + c
        return torch.full_like(t, c)

    def error(self, diff: Tensor, t: Tensor) -> Tensor:
        """The elementwise error of ``diff = pred - target`` (B, ...) float32 at times t (B,)."""
        if self.kind == "l1":
            return diff.abs()
        if self.kind == "pseudo_huber":
            c = self.huber_delta(t).reshape(-1, *[1] * (diff.ndim - 1))
            return 2 * c * (torch.sqrt(diff.pow(2) + c.pow(2)) - c)
        return diff.pow(2)


def latent_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """A per-sample mask (B, 1, H, W) in [0, 1] (pixels) on the latent grid (B, 1, height, width): each latent
    cell's covered fraction (area average), so a cell wholly outside the mask weighs exactly 0."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W); got {tuple(mask.shape)}")
    if mask.shape[-2:] == (height, width):
        return mask.float()
    return F.adaptive_avg_pool2d(mask.float(), (height, width))


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
    loss: Optional[LossConfig] = None,
    mask: Optional[Tensor] = None,
) -> LossOutput:
    """Weighted MSE (or ``loss``'s error) between ``velocity_pred`` and ``target`` (both (B, C, h, w) when masked,
    else (B, ...)) at times ``t`` (B,), averaged over each sample's elements, or over the elements ``mask``
    (B, 1, H, W) in [0, 1] covers (:func:`latent_mask` brings it to the latent grid).

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
    diff = velocity_pred.float() - target.float()
    err = diff.pow(2) if loss is None else loss.error(diff, t)
    if mask is None:
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    else:  # the mean over the masked elements only: weights 0 outside give exactly zero gradient there
        m = latent_mask(mask, *err.shape[-2:]).expand_as(err)
        per_sample = (err * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1e-8)
    if weighting != "none":
        per_sample = per_sample * loss_weight(t, weighting, logit_mean=logit_mean, logit_std=logit_std)
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample)
