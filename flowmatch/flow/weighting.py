"""Loss weightings of every formulation, in one place, in the SD3 paper's notation (Esser et al. 2024, section 2).

Any of flowmatch's losses is an MSE in the space of the model's prediction (:mod:`.parameterization`) times an
optional per-t factor. At fixed x_t the error of a ``kind`` prediction is c_t times the error of the eps it implies
(:func:`~flowmatch.flow.parameterization.error_scale`), so every loss is a weighted eps-MSE:

    loss = eps_weight(t) * ||eps_pred - eps||^2,   eps_weight = c_t^2 * factor(t),

and the SD3 paper writes the same objective as ``-1/2 w_t lambda'_t ||eps_pred - eps||^2`` with lambda the
log-SNR, i.e. ``w_t = -2 eps_weight / lambda'_t`` (:func:`sd3_weight`). The named losses:

- eps-loss (Ho et al. 2020): predict eps, factor 1 (eps_weight = 1);
- v-loss (Salimans & Ho 2022): predict v, factor 1 (eps_weight = (alpha^2 + sigma^2)^2 / alpha^2);
- the rectified-flow loss: predict velocity on the rectified path, factor 1; SD3's w_t = t / (1 - t);
- min-SNR-gamma (Hang et al. 2023): the x0-MSE weighted by min(SNR, gamma), i.e. eps_weight = min(SNR, gamma) /
  SNR in any prediction space (factor = eps_weight / c_t^2).

The time-density weightings (``flow.loss_weighting``: logit-normal, cosmap) multiply on top; they live with the
time distributions in :mod:`.loss` because they are another way to write a time density.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowmatch.flow.parameterization import error_scale
from flowmatch.flow.paths import AffinePath

__all__ = ["eps_weight", "loss_factor", "sd3_weight", "snr"]


def snr(path: AffinePath, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2, (B,)."""
    return torch.exp(path.log_snr(t))


def loss_factor(path: AffinePath, kind: str, t: Tensor, min_snr_gamma: float = 0.0) -> Tensor:
    """The per-t factor on the MSE in ``kind`` space: 1, or min-SNR-gamma's when ``min_snr_gamma > 0``; (B,)."""
    if min_snr_gamma <= 0:
        return torch.ones_like(t)
    ratio = snr(path, t)
    return torch.clamp(ratio, max=min_snr_gamma) / (ratio * error_scale(path, kind, t) ** 2)


def eps_weight(path: AffinePath, kind: str, t: Tensor, min_snr_gamma: float = 0.0) -> Tensor:
    """The weight on ||eps_pred - eps||^2 that the ``kind`` loss (with min-SNR-gamma when > 0) amounts to; (B,)."""
    return error_scale(path, kind, t) ** 2 * loss_factor(path, kind, t, min_snr_gamma)


def sd3_weight(path: AffinePath, kind: str, t: Tensor, min_snr_gamma: float = 0.0) -> Tensor:
    """The SD3 paper's w_t of that loss: ``-2 eps_weight / lambda'_t``; (B,).

    lambda'_t = 2 (alpha' / alpha - sigma' / sigma), so -2 / lambda'_t = 1 / (sigma' / sigma - alpha' / alpha).
    """
    a, s, da, ds = path.coefficients(t)
    return eps_weight(path, kind, t, min_snr_gamma) / (ds / s - da / a)
