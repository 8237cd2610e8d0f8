"""A recipe's formulation: which affine path, what the model predicts, and how the loss is weighted; what the
trainer, validation and the samplers ask of the flow layer when the recipe is not plain rectified flow.

``Formulation(cfg)`` reads ``flow.path``, ``flow.prediction`` and ``flow.min_snr_gamma``. The default (rectified
path, velocity prediction, no min-SNR) takes exactly the code path of :func:`flowmatch.flow.sample_path` and the
unchanged model, so rectified-flow runs are bit-identical with or without this layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flowmatch.flow.loss import LossOutput
from flowmatch.flow.parameterization import Denoised, check_prediction, convert, denoise, from_denoised
from flowmatch.flow.path import PathSample, sample_path
from flowmatch.flow.paths import AffinePath, get_path
from flowmatch.flow.weighting import loss_factor

__all__ = ["Formulation", "check_formulation"]

#: Smallest time at which a VP path's velocity is evaluated: sigma'_t is infinite at t = 0 there.
VP_TIME_FLOOR = 1e-5
#: Where a VP path's likelihood solve starts: DDPM's first discrete step t = 1 / 1000, the eps = 1e-3 at which
#: Song et al. 2021 (appendix D) bound the data likelihood for the VP SDE.
VP_LIKELIHOOD_START = 1e-3


def check_formulation(path: str, prediction: str, min_snr_gamma: float) -> None:
    """ValueError naming the key when ``flow.path``, ``flow.prediction`` or ``flow.min_snr_gamma`` is invalid."""
    get_path(path)
    check_prediction(prediction)
    if not min_snr_gamma >= 0:
        raise ValueError(f"flow.min_snr_gamma must be >= 0 (0 = off; Hang et al. 2023 use 5); got {min_snr_gamma}")


class Formulation:
    """The path, prediction and loss factor of a ``flow`` recipe section (a :class:`~flowmatch.flow.FlowConfig`)."""

    def __init__(self, cfg) -> None:
        check_formulation(cfg.path, cfg.prediction, cfg.min_snr_gamma)
        self.path: AffinePath = get_path(cfg.path)
        self.prediction: str = cfg.prediction
        self.min_snr_gamma: float = float(cfg.min_snr_gamma)

    @property
    def is_rectified_velocity(self) -> bool:
        """Whether the model's output is already the rectified-flow velocity (no conversion anywhere)."""
        return self.path.name == "rectified" and self.prediction == "velocity"

    @property
    def likelihood_start(self) -> float:
        """Where the likelihood ODE starts (:func:`flowmatch.sampling.log_likelihood`'s ``t_start``): t = 0 where the
        velocity is finite there (rectified), else VP_LIKELIHOOD_START (the likelihood of the data at t = eps)."""
        return VP_LIKELIHOOD_START if self.path.variance_preserving else 0.0

    def training_sample(self, x0: Tensor, noise: Tensor, t: Tensor) -> PathSample:
        """Model input x_t and the regression target in the prediction's space; x0, noise (B, ...), t (B,)."""
        if self.is_rectified_velocity:
            return sample_path(x0, noise, t)
        t = t.to(device=x0.device, dtype=x0.dtype)
        target = from_denoised(self.path, self.prediction, Denoised(x0, noise), t)
        return PathSample(x_t=self.path.interpolate(x0, noise, t), t=t, target=target)

    def reweight(self, out: LossOutput, t: Tensor) -> LossOutput:
        """``out`` with min-SNR-gamma's factor applied per sample (``out`` itself when it is off)."""
        if self.min_snr_gamma <= 0:
            return out
        per_sample = out.per_sample * loss_factor(self.path, self.prediction, t.float(), self.min_snr_gamma)
        return LossOutput(per_sample.mean(), per_sample)

    def velocity_time(self, t: Tensor) -> Tensor:
        """t floored where the path's velocity is singular (VP at t = 0); t itself on the rectified path."""
        return t.clamp(min=VP_TIME_FLOOR) if self.path.variance_preserving else t

    def to_velocity(self, model: Callable) -> Callable:
        """``model(x, t, *rest) -> prediction`` as ``(x, t, *rest) -> velocity`` (``model`` itself by default)."""
        if self.is_rectified_velocity:
            return model

        def velocity(x: Tensor, t: Tensor, *rest) -> Tensor:
            tv = self.velocity_time(t)
            return convert(self.path, self.prediction, "velocity", x, model(x, tv, *rest), tv)

        return velocity

    def denoise(self, x: Tensor, pred: Tensor, t: Tensor) -> Denoised:
        """x0 and eps implied by the model's prediction at (x, t)."""
        return denoise(self.path, self.prediction, x, pred, t)
