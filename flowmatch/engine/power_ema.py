"""Power-function EMA profiles (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): the arithmetic behind the EMA's warm-up, the tracked profiles and post-hoc EMA.

An EMA whose n-th update (n = 1, 2, ...) uses the decay ``beta_n = (1 - 1/n)^(gamma + 1)`` averages the weights
theta_1 .. theta_n after each update with the weights ``(k^(gamma+1) - (k-1)^(gamma+1)) / n^(gamma+1)``: exactly
the power-function profile ``p(tau) = (gamma + 1) tau^gamma / n^(gamma+1)`` on [0, n] integrated over the
trajectory that holds theta_k on (k-1, k]. Its first update copies the weights, so it never holds the
initialisation, and its length grows with the run: the profile's standard deviation relative to n is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))

(independent of n), the number Karras et al. use to name an EMA length. Here gamma > 0, so 0 < sigma_rel <
sqrt(1/12) ~ 0.289.

Post-hoc EMA: snapshots of two profiles taken every few steps are each an integral of the trajectory against a
known profile, so any other profile ``p_r`` (another sigma_rel, at a snapshot's step) is approximated by the
combination ``sum_i x_i p_i`` (coefficients summing to 1) closest to it in L2 on [0, inf); the same combination of
the snapshots' weights is then the reconstructed EMA. Its error is the integral of the trajectory against the
residual profile, so it depends only on how densely the snapshots cover the run, not on the model. The inner
product of two profiles has a closed form, written here as ratios below 1 so that large step counts and exponents
do not overflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# sigma_rel as gamma -> 0; gamma > 0 keeps every snapshot's profile finite at tau = 0.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma`` (> 0)."""
    if not gamma > 0:
        raise ValueError(f"the power-function exponent gamma must be > 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile whose relative width is ``sigma_rel``.

    sigma_rel falls monotonically as gamma grows from 0, so bisection finds it to double precision.
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (typical: 0.05-0.15), got {sigma_rel}")
    lo, hi = 0.0, 1.0
    while sigma_rel_of(hi) > sigma_rel:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sigma_rel_of(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def power_decay(updates: int, gamma: float) -> float:
    """The decay of the ``updates``-th update (1-based) of the power-function EMA with exponent ``gamma``."""
    if updates < 1:
        raise ValueError(f"EMA updates are counted from 1, got {updates}")
    return (1.0 - 1.0 / updates) ** (gamma + 1.0)


def warmup_decay(updates: int, decay: float, gamma: float | None) -> float:
    """The decay of the ``updates``-th update (1-based) of the training EMA: ``min(decay, (1 - 1/n)^(gamma+1))``.

    The one place the warm-up is written. Until the cap takes over, after about ``(gamma + 1) / (1 - decay)``
    updates, the EMA is the power-function average of the whole run so far; ``gamma`` None means no warm-up
    (every update uses ``decay``).
    """
    if gamma is None:
        return decay
    return min(decay, power_decay(updates, gamma))


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """L2 inner product on [0, inf) of the profiles ``(g+1) tau^g / t^(g+1)`` on [0, t] for (t_a, g_a), (t_b, g_b).

    ``int_0^m (ga+1)(gb+1) tau^(ga+gb) / (t_a^(ga+1) t_b^(gb+1)) dtau`` with m = min(t_a, t_b), written as
    ``(ga+1)(gb+1) / (ga+gb+1) * (m/t_a)^(ga+1) * (m/t_b)^(gb+1) / m``.
    """
    m = min(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (m / t_a) ** (gamma_a + 1)
            * (m / t_b) ** (gamma_b + 1) / m)


@dataclass
class Reconstruction:
    """The combination of snapshots that best approximates one power-function profile."""

    coefficients: np.ndarray
    """(S,) weight of each snapshot profile (they need not be positive; they sum to 1)."""
    residual: float
    """L2 norm of (combination - target profile) relative to the target profile's norm: 0 is exact."""


def reconstruct(sources: Sequence[tuple[float, float]], target: tuple[float, float]) -> Reconstruction:
    """Coefficients of the profiles ``sources`` [(t_i, gamma_i)] whose combination best matches ``target`` (t, gamma)
    in L2, among combinations whose coefficients sum to 1.

    Every profile integrates to 1, and so must the combination: otherwise the reconstruction scales the weights
    themselves, whose size dwarfs how much they move over a run (unconstrained, the coefficients of a sigma_rel
    between two tracked ones sum to 1 + 3e-5, enough to make the reconstruction 25x worse on a toy trajectory).
    Solves the equality-constrained normal equations ``[[A, 1], [1^T, 0]] [x, lambda] = [b, 1]`` with
    ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``, in float64 by least squares (``A`` is a Gram matrix,
    close to singular when snapshots are dense).
    """
    if not sources:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    n = len(sources)
    gram = np.array([[profile_dot(ta, ga, tb, gb) for tb, gb in sources] for ta, ga in sources])
    rhs = np.array([profile_dot(ta, ga, *target) for ta, ga in sources])
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = gram, 1.0, 1.0
    x = np.linalg.lstsq(kkt, np.append(rhs, 1.0), rcond=None)[0][:n]
    # ||sum x_i p_i - p_r||^2 = x.A.x - 2 x.b + <p_r, p_r>
    target_sq = profile_dot(*target, *target)
    err_sq = max(0.0, float(x @ gram @ x - 2 * x @ rhs + target_sq))
    return Reconstruction(coefficients=x, residual=math.sqrt(err_sq / target_sq))
