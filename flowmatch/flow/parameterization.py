"""What the network predicts on an affine path, and the conversions between every choice.

On a path ``x_t = alpha_t x0 + sigma_t eps`` (:mod:`flowmatch.flow.paths`; t = 0 data, t = 1 noise, the one time
convention of :mod:`flowmatch.flow.path`) a model may predict:

- ``velocity``: ``u = alpha'_t x0 + sigma'_t eps``, the probability-flow ODE's dx/dt (rectified flow: noise - x0);
- ``eps``: the noise (Ho et al. 2020);
- ``v``: ``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022);
- ``x0``: the data.

Given x_t, each of them fixes x0 and eps (the 2 x 2 system with x_t = alpha x0 + sigma eps), so every prediction
converts into every other, and the score is ``-eps / sigma``:

    from eps:      x0 = (x - sigma eps) / alpha
    from x0:       eps = (x - alpha x0) / sigma
    from v:        eps = (alpha v + sigma x) / (alpha^2 + sigma^2),  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
    from velocity: eps = (alpha u - alpha' x) / D,  x0 = (sigma' x - sigma u) / D,  D = alpha sigma' - sigma alpha'

(rectified flow: D = 1, and these are :func:`flowmatch.flow.x0_from_velocity` and ``noise_from_velocity``). The
conversions are affine in the prediction at fixed (x, t), so classifier-free guidance gives the same result in
any of the four spaces. Shapes: x, predictions (B, ...), t (B,).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.flow.paths import AffinePath

__all__ = ["Denoised", "PREDICTIONS", "check_prediction", "convert", "denoise", "error_scale", "from_denoised",
           "score"]

PREDICTIONS = ("velocity", "eps", "v", "x0")


def check_prediction(name: str, key: str = "flow.prediction") -> str:
    """``name`` if it is a prediction, else a ValueError naming ``key``, the choices and the nearest spelling."""
    if name not in PREDICTIONS:
        raise choice_error(key, name, PREDICTIONS)
    return name


def _col(c: Tensor, x: Tensor) -> Tensor:
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class Denoised:
    """The data and noise a prediction implies at x_t."""

    x0: Tensor
    """(B, ...) predicted data."""
    eps: Tensor
    """(B, ...) predicted noise."""


def denoise(path: AffinePath, kind: str, x: Tensor, pred: Tensor, t: Tensor) -> Denoised:
    """x0 and eps implied by a ``kind`` prediction ``pred`` at (x, t)."""
    a, s, da, ds = (_col(c, x) for c in path.coefficients(t.to(x.dtype)))
    if kind == "eps":
        return Denoised((x - s * pred) / a, pred)
    if kind == "x0":
        return Denoised(pred, (x - a * pred) / s)
    if kind == "v":
        norm = a**2 + s**2
        return Denoised((a * x - s * pred) / norm, (a * pred + s * x) / norm)
    if kind == "velocity":
        det = a * ds - s * da
        return Denoised((ds * x - s * pred) / det, (a * pred - da * x) / det)
    raise choice_error("prediction", kind, PREDICTIONS)


def from_denoised(path: AffinePath, kind: str, d: Denoised, t: Tensor) -> Tensor:
    """The ``kind`` prediction of data ``d.x0`` and noise ``d.eps`` at t (also the training target)."""
    if kind == "eps":
        return d.eps
    if kind == "x0":
        return d.x0
    a, s, da, ds = (_col(c, d.x0) for c in path.coefficients(t.to(d.x0.dtype)))
    if kind == "v":
        return a * d.eps - s * d.x0
    if kind == "velocity":
        return da * d.x0 + ds * d.eps
    raise choice_error("prediction", kind, PREDICTIONS)


def convert(path: AffinePath, source: str, target: str, x: Tensor, pred: Tensor, t: Tensor) -> Tensor:
    """A ``source`` prediction at (x, t) as a ``target`` one; returns ``pred`` itself when they are the same."""
    if source == target:
        return pred
    return from_denoised(path, target, denoise(path, source, x, pred, t), t)


def score(path: AffinePath, kind: str, x: Tensor, pred: Tensor, t: Tensor) -> Tensor:
    """The score grad log p_t(x) = -eps / sigma_t implied by a ``kind`` prediction; undefined at t = 0."""
    eps = denoise(path, kind, x, pred, t).eps
    return -eps / _col(path.sigma(t.to(x.dtype)), x)


def error_scale(path: AffinePath, kind: str, t: Tensor) -> Tensor:
    """c_t with (error of a ``kind`` prediction) = c_t * (error of the eps it implies), at fixed x_t: (B,).

    eps: 1; x0: -sigma / alpha; v: (alpha^2 + sigma^2) / alpha; velocity: D / alpha. An MSE in ``kind`` space is
    therefore an eps-MSE weighted by c_t^2 (:mod:`flowmatch.flow.weighting`).
    """
    a, s, da, ds = path.coefficients(t)
    if kind == "eps":
        return t.new_ones(t.shape)
    if kind == "x0":
        return -s / a
    if kind == "v":
        return (a**2 + s**2) / a
    if kind == "velocity":
        return (a * ds - s * da) / a
    raise choice_error("prediction", kind, PREDICTIONS)
