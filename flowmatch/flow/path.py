"""The rectified-flow probability path: flowmatch's one time convention.

Convention (declared here and nowhere else; every other module imports these functions):

    t = 0 is data, t = 1 is noise,
    x_t = (1 - t) * x0 + t * noise,
    velocity v = d x_t / d t = noise - x0.

This is the straight path of the SD3 paper (Esser et al. 2024, section 3, "rectified flow") with the same
orientation as diffusers' flow-matching schedulers. Sampling integrates the ODE dx/dt = v(x, t) backwards from
t = 1 (noise) to t = 0 (data).

Given any one of (velocity, x0, noise) and the point x_t, the other two follow:

    x0    = x_t - t * v            noise = x_t + (1 - t) * v
    v     = (x_t - x0) / t         v     = (noise - x_t) / (1 - t)

The last two divide by t and 1 - t, so they are undefined at t = 0 and t = 1 respectively.

Shapes: ``x0``, ``noise``, ``x_t`` and ``v`` are (B, ...) tensors of one shape; ``t`` is (B,) (or a Python float
or a 0-d tensor) and is broadcast over the trailing dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "PathSample",
    "interpolate",
    "noise_from_velocity",
    "sample_path",
    "velocity_from_noise",
    "velocity_from_x0",
    "velocity_target",
    "x0_from_velocity",
]


def expand_time(t: Tensor | float, x: Tensor) -> Tensor | float:
    """Broadcast a time ``t`` of shape (B,) against ``x`` of shape (B, ...) as (B, 1, ..., 1).

    Python floats and 0-d tensors pass through unchanged (they broadcast already).
    """
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must have shape (B,) matching x's batch size {x.shape[0]}; got t of shape {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """The point on the path: ``x_t = (1 - t) * x0 + t * noise``; x0, noise (B, ...), t (B,) -> (B, ...)."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``noise - x0`` (constant along the straight path); (B, ...) -> (B, ...)."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Data prediction from a velocity: ``x0 = x_t - t * v``; (B, ...), (B, ...), (B,) -> (B, ...)."""
    return x_t - expand_time(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Noise prediction from a velocity: ``noise = x_t + (1 - t) * v``; (B, ...), (B, ...), (B,) -> (B, ...)."""
    return x_t + (1 - expand_time(t, x_t)) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """Velocity from a data prediction: ``v = (x_t - x0) / t``; undefined at t = 0. Shapes as above."""
    return (x_t - x0) / expand_time(t, x_t)


def velocity_from_noise(x_t: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """Velocity from a noise prediction: ``v = (noise - x_t) / (1 - t)``; undefined at t = 1. Shapes as above."""
    return (noise - x_t) / (1 - expand_time(t, x_t))


@dataclass
class PathSample:
    """One training example drawn on the path: the model sees (x_t, t) and regresses ``target``."""

    x_t: Tensor
    """(B, ...) noisy input ``(1 - t) * x0 + t * noise``."""
    t: Tensor
    """(B,) times in [0, 1]; t = 1 is pure noise."""
    target: Tensor
    """(B, ...) velocity target ``noise - x0``."""


def sample_path(x0: Tensor, noise: Tensor, t: Tensor) -> PathSample:
    """Build the model input and regression target for data ``x0`` (B, ...), ``noise`` (B, ...), ``t`` (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    if not isinstance(t, Tensor) or t.ndim != 1:
        raise ValueError("sample_path needs t as a (B,) tensor, one time per example")
    # The model may run in bf16, but the path is formed in the data's dtype so x_t and target stay consistent.
    t = t.to(device=x0.device, dtype=x0.dtype)
    return PathSample(x_t=interpolate(x0, noise, t), t=t, target=velocity_target(x0, noise))
