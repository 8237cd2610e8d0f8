"""MeanFlow (Geng et al. 2025): regress the average velocity over an interval, for 1- and few-step sampling.

Conventions (the path of :mod:`flowmatch.flow.path`: t = 0 data, t = 1 noise, v = noise - x0): for r <= t,

    u(x_t, r, t) = 1 / (t - r) * integral_r^t v(x_s, s) ds,    so    x_r = x_t - (t - r) u(x_t, r, t),

and at r = t, u is the instantaneous velocity v. Differentiating (t - r) u = integral_r^t v ds in t gives the
MeanFlow identity

    u(x_t, r, t) = v(x_t, t) - (t - r) d/dt u(x_t, r, t),

where d/dt is the total derivative along the flow, the JVP of u with tangent (dx/dt, dt/dt, dr/dt) = (v, 1, 0)
(:func:`flowmatch.flow.jvp.time_derivative`). Training regresses u_theta on the stop-gradient right-hand side
with the per-sample velocity v = noise - x0 (or a guided or teacher velocity), and a fraction of the samples
have r = t, where the target is v itself and the loss is plain flow matching.

The loss is weighted adaptively per sample, w = 1 / (||err||^2 + c)^p with w stop-gradient (the paper's p = 1,
c = 1e-3), which keeps rare large errors from dominating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.flow.jvp import JVP_BACKENDS
from flowmatch.flow.path import expand_time

__all__ = ["JVP_CHOICES", "MeanFlowConfig", "adaptive_loss", "interval_count", "meanflow_target", "order_times"]

JVP_CHOICES = ("auto",) + JVP_BACKENDS


@dataclass
class MeanFlowConfig:
    """The recipe's ``flow.meanflow`` section (used when ``flow.objective: meanflow``)."""

    interval_fraction: float = 0.25
    """Fraction of each micro batch trained on an interval r < t; the rest has r = t (flow matching). The
    paper's best on ImageNet is 25%."""
    adaptive_power: float = 1.0
    """p of the adaptive loss weight 1 / (err^2 + c)^p; 0 = plain squared error (the paper uses 1.0)."""
    adaptive_eps: float = 1e-3
    """c of the adaptive loss weight (the paper's 1e-3)."""
    jvp: str = "auto"
    """d/dt u backend: auto (exact below ZeRO-3, finite_difference at ZeRO-3) | exact | finite_difference."""
    fd_step: float = 1e-4
    """Step e of the finite-difference backend, in units of t. The MMDiT embeds 1000 t in sinusoids up to 1 rad
    per unit, so e must stay well below 1e-3: on a tiny MMDiT 1e-4 agrees with the exact JVP to 0.13% of its
    largest entry, 1e-3 only to 12% (tests/test_fewstep.py)."""

    def __post_init__(self) -> None:
        if self.jvp not in JVP_CHOICES:
            raise choice_error("flow.meanflow.jvp", self.jvp, JVP_CHOICES)
        if not 0.0 <= self.interval_fraction <= 1.0:
            raise ValueError(f"flow.meanflow.interval_fraction must be in [0, 1]; got {self.interval_fraction}")
        if self.adaptive_power < 0 or not self.adaptive_eps > 0 or not self.fd_step > 0:
            raise ValueError("flow.meanflow.adaptive_power must be >= 0 and adaptive_eps, fd_step > 0; got "
                             f"{self.adaptive_power}, {self.adaptive_eps}, {self.fd_step}")

    def backend(self, zero_stage: int) -> str:
        """The JVP backend this run uses: ``jvp`` unless auto, which picks finite differences under ZeRO-3."""
        if self.jvp != "auto":
            return self.jvp
        return "finite_difference" if zero_stage == 3 else "exact"


def interval_count(batch: int, fraction: float) -> int:
    """How many of ``batch`` samples get r < t: a fixed count, so every step has the same shapes."""
    return int(round(batch * fraction))


def order_times(a: Tensor, b: Tensor, n_interval: int) -> tuple[Tensor, Tensor]:
    """(t, r) from two draws a, b (B,): t = max, r = min on the first ``n_interval`` rows, r = t on the rest."""
    t = torch.maximum(a, b)
    r = torch.minimum(a, b)
    r = torch.cat([r[:n_interval], t[n_interval:]])
    return t, r


def meanflow_target(v: Tensor, du_dt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """The stop-gradient target ``v - (t - r) du/dt``; v, du_dt (B, ...), t, r (B,) -> (B, ...) detached."""
    return (v - expand_time(t - r, v) * du_dt).detach()


def adaptive_loss(pred: Tensor, target: Tensor, *, power: float, eps: float) -> tuple[Tensor, Tensor]:
    """(loss (), per-sample squared error (B,) detached, unweighted for logging): the loss is the mean over samples
    of each one's mean squared error divided by the stop-gradient ``(error + eps) ** power``; float32."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    weighted = err / (err.detach() + eps).pow(power) if power else err
    return weighted.mean(), err.detach()
