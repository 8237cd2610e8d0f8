"""Training-time distributions, the timestep shift, and the sampling grid, all from one recipe section.

:class:`TimeSchedule` is the single object that knows the shift: training draws ``t`` from
:meth:`TimeSchedule.sample` and sampling walks :meth:`TimeSchedule.sampling_grid` (or passes
:meth:`TimeSchedule.shift_for` to :func:`flowmatch.sampling.sample_ode`), so the two cannot disagree and the shift
is never applied twice.

The shift (SD3 paper, section 5.3.2) multiplies the odds of noise, ``t / (1 - t)``, by ``a``:
``t' = a t / (1 + (a - 1) t)``. Shifts compose by multiplication, which is how the modes below combine the fixed
``shift`` with the resolution-dependent factor.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from flowmatch.errors import choice_error
from flowmatch.flow.formulation import check_formulation
from flowmatch.flow.guided import GuidanceInputConfig
from flowmatch.flow.loss import LOSS_WEIGHTINGS, LossConfig, LossOutput, flow_matching_loss, loss_weight
from flowmatch.flow.meanflow import MeanFlowConfig
from flowmatch.flow.objectives import OBJECTIVES
from flowmatch.flow.shortcut import ShortcutConfig

__all__ = [
    "FlowConfig",
    "SHIFT_MODES",
    "TIME_DISTRIBUTIONS",
    "TimeSchedule",
    "shift_time",
    "shifted_grid",
]

TIME_DISTRIBUTIONS = ("uniform", "logit_normal", "mode", "cosmap")
SHIFT_MODES = ("fixed", "resolution", "sequence")

# The mode-sampling map f(u; s) is monotonic, hence a valid inverse CDF, only for -1 <= s <= 2 / (pi - 2)
# (SD3 paper, section 3.1).
_MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

# Training times are kept this far from 0 and 1: the velocity <-> x0/noise conversions divide by t and 1 - t,
# and density weightings are 0/0 at the ends. The probability mass removed is negligible.
TIME_EPS = 1e-5


@dataclass
class FlowConfig:
    """The recipe's ``flow`` section: how training draws t, how the shift is chosen, the loss weighting."""

    time_dist: str = "logit_normal"
    """Training time distribution: uniform | logit_normal | mode | cosmap (SD3 paper, section 3.1)."""
    logit_mean: float = 0.0
    """Mean m of the logit-normal distribution; m = 0 is the SD3 paper's best (its rf/lognorm(0.00, 1.00))."""
    logit_std: float = 1.0
    """Standard deviation s > 0 of the logit-normal distribution; SD3 paper's best is 1.0."""
    mode_scale: float = 1.29
    """Scale s of mode sampling, in [-1, 2/(pi-2)]; 1.29 is the SD3 paper's rf/mode(1.29)."""
    shift: float = 1.0
    """Timestep shift a > 0 (1 = none); SD3 uses 3.0 at 1024^2. In resolution/sequence modes it multiplies the
    resolution-dependent factor."""
    shift_mode: str = "fixed"
    """fixed: a = shift | resolution: a = shift * sqrt(seq_len / base_seq_len) (SD3) | sequence: FLUX's mu."""
    base_seq_len: int = 256
    """Image tokens at the base resolution: 256^2 px with an 8x VAE and 2x2 patches (SD3 base; FLUX's 256)."""
    max_seq_len: int = 4096
    """Image tokens at which the sequence-mode shift reaches max_shift (FLUX: 4096, i.e. 1024^2 px)."""
    base_shift: float = 0.5
    """Sequence mode: mu at base_seq_len (FLUX's base_shift 0.5); the shift factor is exp(mu)."""
    max_shift: float = 1.15
    """Sequence mode: mu at max_seq_len (FLUX's max_shift 1.15); mu is linear in seq_len between and beyond."""
    loss_weighting: str = "none"
    """Per-t loss weight: none | logit_normal | cosmap (a density; see flowmatch/flow/loss.py)."""
    path: str = "rectified"
    """Affine path x_t = alpha_t x0 + sigma_t eps: rectified | vp_linear (DDPM) | vp_cosine (flow/paths.py)."""
    prediction: str = "velocity"
    """What the model predicts: velocity | eps | v | x0 (flow/parameterization.py); the loss is MSE in that space."""
    min_snr_gamma: float = 0.0
    """min-SNR-gamma loss weighting (Hang et al. 2023 use 5); 0 = off (flow/weighting.py)."""
    caption_dropout: float = 0.1
    """Probability of training on the empty caption's encoding, for classifier-free guidance (Ho & Salimans
    2022 use 0.1-0.2)."""
    objective: str = "flow"
    """flow (rectified flow) | meanflow | shortcut (few-step: need model.interval_embed); see flow/objectives.py."""
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    """MeanFlow settings: interval fraction, adaptive weight, JVP backend."""
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    """Shortcut-model settings: self-consistency fraction, step levels."""
    guidance: GuidanceInputConfig = field(default_factory=GuidanceInputConfig)
    """Guidance scales drawn in training when the model takes one (model.guidance_embed)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The elementwise error: mse, l1 or pseudo-Huber with its delta schedule (flow/loss.py)."""
    teacher: Optional[str] = None
    """Run or checkpoint directory of a frozen flow model whose guided velocity replaces noise - x0
    (distillation); None = learn from data."""
    teacher_steps: int = 0
    """With a teacher and a few-step objective: > 0 makes the interval rows (r < t) regress the average velocity of
    the teacher's own guided solve from t to r in this many midpoint steps (flow-map distillation,
    flow/flowmap.py) instead of the objective's self-made target (no JVP, no half steps); 0 = the objective's."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise choice_error("flow.objective", self.objective, OBJECTIVES)
        if self.time_dist not in TIME_DISTRIBUTIONS:
            raise choice_error("flow.time_dist", self.time_dist, TIME_DISTRIBUTIONS)
        if self.shift_mode not in SHIFT_MODES:
            raise choice_error("flow.shift_mode", self.shift_mode, SHIFT_MODES)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise choice_error("flow.loss_weighting", self.loss_weighting, tuple(LOSS_WEIGHTINGS))
        check_formulation(self.path, self.prediction, self.min_snr_gamma)
        if not self.logit_std > 0:
            raise ValueError(f"flow.logit_std must be > 0; got {self.logit_std}")
        if not -1.0 <= self.mode_scale <= _MODE_SCALE_MAX:
            raise ValueError(
                f"flow.mode_scale must lie in [-1, {_MODE_SCALE_MAX:.4f}] (2/(pi-2)) for mode sampling to be a "
                f"valid distribution; got {self.mode_scale}"
            )
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"flow.shift must be a finite number > 0 (1.0 = no shift); got {self.shift}")
        if not (isinstance(self.base_seq_len, int) and self.base_seq_len > 0):
            raise ValueError(f"flow.base_seq_len must be a positive integer; got {self.base_seq_len!r}")
        if not (isinstance(self.max_seq_len, int) and self.max_seq_len > self.base_seq_len):
            raise ValueError(
                f"flow.max_seq_len must be an integer > flow.base_seq_len ({self.base_seq_len}); "
                f"got {self.max_seq_len!r}"
            )
        if not (isinstance(self.teacher_steps, int) and 0 <= self.teacher_steps <= 64):
            raise ValueError(f"flow.teacher_steps must be an integer in [0, 64] (0 = off); got {self.teacher_steps!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"flow.caption_dropout must be a probability in [0, 1]; got {self.caption_dropout}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Shift times towards noise: ``t' = a t / (1 + (a - 1) t)`` with ``a = shift``; any shape -> same shape.

    Written as ``a t / (a t + 1 - t)`` so that 0 maps to exactly 0 and 1 to exactly 1 in floating point;
    ``shift == 1`` returns a copy of ``t`` untouched.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    if shift == 1.0:
        return t.clone()
    return shift * t / (shift * t + (1 - t))


def check_steps(steps: int) -> int:
    """``steps`` as an int if it is a whole number >= 1 (NumPy integers included), else a ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    return int(steps)


def shifted_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The sampling grid ``t_i = shift_time(1 - i / steps)``, i = 0..steps: (steps + 1,) float64 from 1 to 0."""
    steps = check_steps(steps)
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


class TimeSchedule:
    """The recipe's time distribution and its matching sampling schedule (one shift for both).

    ``seq_len`` is the number of image tokens the model sees (latent H * W / patch^2); it only matters in the
    ``resolution`` and ``sequence`` shift modes.
    """

    def __init__(self, cfg: FlowConfig) -> None:
        self.cfg = cfg

    def shift_for(self, seq_len: int) -> float:
        """The shift factor a for images of ``seq_len`` tokens: the one place it is computed."""
        cfg = self.cfg
        if not seq_len > 0:
            raise ValueError(f"seq_len must be a positive number of image tokens; got {seq_len}")
        if cfg.shift_mode == "fixed":
            return float(cfg.shift)
        if cfg.shift_mode == "resolution":
            # SD3: a = sqrt(m / n) for m, n pixel counts; tokens are proportional to pixels at a fixed
            # autoencoder factor and patch size, so the token ratio is the pixel ratio.
            return float(cfg.shift * math.sqrt(seq_len / cfg.base_seq_len))
        # FLUX: mu is linear in the sequence length through (base_seq_len, base_shift) and
        # (max_seq_len, max_shift), and its time shift exp(mu) t / (exp(mu) t + 1 - t) is ours with a = exp(mu).
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
        mu = cfg.base_shift + slope * (seq_len - cfg.base_seq_len)
        return float(cfg.shift * math.exp(mu))

    def sample(
        self,
        n: int,
        *,
        seq_len: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``n`` training times, already shifted: (n,) float32 in [TIME_EPS, 1 - TIME_EPS].

        Randomness comes from ``generator`` (drawn on the generator's device, then moved to ``device``), so a
        CPU generator gives the same times on any accelerator.
        """
        cfg = self.cfg
        gen_device = generator.device if generator is not None else (device or "cpu")
        kw = dict(generator=generator, device=gen_device, dtype=torch.float64)
        if cfg.time_dist == "logit_normal":
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, **kw))
        else:
            u = torch.rand(n, **kw)
            if cfg.time_dist == "uniform":
                t = u
            elif cfg.time_dist == "mode":
                # SD3 mode sampling: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u); decreasing from 1 to 0, so the
                # q-quantile of t is f(1 - q). s > 0 puts more mass in the middle, s < 0 at the ends.
                t = 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
            else:  # cosmap
                # SD3 CosMap: 1 - 1 / (tan(pi u / 2) + 1), written as sin / (sin + cos) so u -> 1 stays finite.
                s, c = torch.sin(math.pi / 2 * u), torch.cos(math.pi / 2 * u)
                t = s / (s + c)
        t = shift_time(t, self.shift_for(seq_len)).clamp(TIME_EPS, 1 - TIME_EPS)
        return t.to(device=device or gen_device, dtype=torch.float32)

    def sampling_grid(self, steps: int, *, seq_len: int) -> Tensor:
        """Times for an ODE sampler with ``steps`` steps: (steps + 1,) float64 from 1 to 0, same shift as training."""
        return shifted_grid(steps, self.shift_for(seq_len))

    def loss_weight(self, t: Tensor) -> Tensor:
        """The recipe's per-t loss weight, t (B,) -> (B,)."""
        cfg = self.cfg
        return loss_weight(t, cfg.loss_weighting, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)

    def loss(self, velocity_pred: Tensor, target: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> LossOutput:
        """:func:`flow_matching_loss` with the recipe's weighting and error; shapes (B, ...), (B, ...), (B,) and
        the optional per-sample mask (B, 1, H, W)."""
        cfg = self.cfg
        return flow_matching_loss(
            velocity_pred, target, t, cfg.loss_weighting, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
            loss=cfg.loss, mask=mask,
        )
