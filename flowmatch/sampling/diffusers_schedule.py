"""How flowmatch's sampling grid relates to diffusers' `FlowMatchEulerDiscreteScheduler`, and the scheduler
settings and `sigmas=` argument that reproduce it exactly.

Both sides integrate the same ODE the same way: diffusers' sigma is our t (t = 1 noise, t = 0 data,
``x_t = (1 - t) x0 + t noise``, velocity ``noise - x0``), its model timestep is 1000 t (FLUX's transformer
receives t and multiplies by 1000 itself), and its Euler step ``x + (sigma_next - sigma) v`` is ours. They can
differ only in the grid of times. With ``s_a(t) = a t / (1 + (a - 1) t)`` (the shift,
:func:`flowmatch.flow.shift_time`) and N steps:

- **flowmatch**: ``t_i = s_a(1 - i / N)``, i = 0..N, with ``a = TimeSchedule.shift_for(seq_len)``
  (:func:`flowmatch.flow.shifted_grid`).
- **diffusers, static shift** (``use_dynamic_shifting=False``; SD3's and SD3.5's scheduler, ``shift=3.0``):
  ``set_timesteps(N)`` without sigmas, which `StableDiffusion3Pipeline` calls by default, gives
  ``s_a(linspace(1, m, N))`` then 0, where ``m = s_a(1 / 1000)`` is the smallest shifted training sigma: the
  shift is applied to an already shifted end point and the last step goes from about ``s_a(m)`` to 0, so
  **diffusers' default SD3 grid is not ours** (:func:`diffusers_default_sigmas` computes it).
- **diffusers, dynamic shift** (``use_dynamic_shifting=True``; FLUX's scheduler, base_shift 0.5, max_shift 1.15
  over 256..4096 image tokens): `FluxPipeline` passes ``sigmas = linspace(1, 1/N, N)`` and ``mu`` linear in the
  image sequence length, and the scheduler applies ``exp(mu) / (exp(mu) + 1/t - 1)``, which is ``s_a`` with
  ``a = exp(mu)``. flowmatch's ``sequence`` shift mode computes the same mu, so **FLUX's default grid is ours**
  when ``flow.shift = 1`` (ours multiplies exp(mu) by ``flow.shift``).
- **Exactly ours, any pipeline**: pass ``sigmas=`` :func:`diffusers_sigmas` (N) (``1 - i / N`` for i < N) to a
  scheduler whose shift is ours: static ``shift = a`` (:func:`scheduler_config`), or dynamic with
  ``mu = log a`` (:func:`mu_for`). The scheduler shifts them and appends 0: ``s_a(1 - i / N)``, i = 0..N.

Grids agree to float32 rounding: diffusers holds sigmas and timesteps in float32 (964.28564 for 964.28571),
flowmatch in float64. At equal inputs the two models' velocities agree to float64 rounding, so that rounding is
all that separates the trajectories: below 2e-4 per latent value over 10 guided steps on the tiny random models
of the tests, more (5e-3) for the tiny SD3-medium layout without QK-norm, whose random weights make the velocity
unusually sensitive to t. To generate a diffusers pipeline's images, :class:`PipelineGrid` takes the grid from
the pipeline's own scheduler and rounds the timesteps as its transformer sees them, which removes that rounding
(`flowmatch.Pipeline.from_diffusers`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from flowmatch.families import diffusers_pipeline
from flowmatch.flow import TimeSchedule
from flowmatch.flow.timesteps import check_steps, shift_time

__all__ = ["PipelineGrid", "diffusers_default_sigmas", "diffusers_sigmas", "mu_for", "scheduler_config"]

#: diffusers' FlowMatchEulerDiscreteScheduler default training steps; its timesteps are sigma * this.
NUM_TRAIN_TIMESTEPS = 1000


def diffusers_sigmas(steps: int) -> list[float]:
    """The `sigmas=` argument (N values, unshifted: 1 - i / N) with which a scheduler configured with our shift
    (:func:`scheduler_config`, or dynamic with ``mu=`` :func:`mu_for`) walks exactly flowmatch's N-step grid."""
    steps = check_steps(steps)
    return np.linspace(1.0, 1.0 / steps, steps).tolist()


def diffusers_default_sigmas(steps: int, shift: float) -> list[float]:
    """The N + 1 sigmas diffusers' static-shift scheduler walks when no `sigmas=` is given (StableDiffusion3Pipeline's
    default): shift applied to ``linspace(1, s(1/1000), N)``, then 0. Not flowmatch's grid (see the module)."""
    import torch

    steps = check_steps(steps)
    sigma_min = shift_time(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift).item()
    unshifted = torch.from_numpy(np.linspace(1.0, sigma_min, steps))
    return [*shift_time(unshifted, shift).tolist(), 0.0]


def mu_for(schedule: TimeSchedule, seq_len: int) -> float:
    """The ``mu=`` that makes a dynamic-shift scheduler use our shift for `seq_len` image tokens: log a."""
    return math.log(schedule.shift_for(seq_len))


def scheduler_config(schedule: TimeSchedule, seq_len: Optional[int] = None) -> dict[str, Any]:
    """`FlowMatchEulerDiscreteScheduler` settings whose shift is the run's, so that with `sigmas=`
    :func:`diffusers_sigmas` it walks flowmatch's grid at every image size the pipelines compute mu for.

    ``fixed`` shift: a static ``shift``. ``sequence`` shift with ``flow.shift = 1``: dynamic shifting with the
    same base and max sequence lengths and shifts (mu as FLUX computes it). Other settings (``resolution``
    mode, or a sequence-mode ``flow.shift`` other than 1) have no diffusers counterpart for all sizes: the
    static shift of `seq_len` image tokens is returned, exact at that size only (or pass ``mu=`` :func:`mu_for`
    to a dynamic scheduler per size); ValueError when `seq_len` is missing then.
    """
    cfg = schedule.cfg
    if cfg.shift_mode == "fixed":
        return dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(cfg.shift), use_dynamic_shifting=False)
    if cfg.shift_mode == "sequence" and cfg.shift == 1.0:
        return dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0, use_dynamic_shifting=True,
                    base_shift=cfg.base_shift, max_shift=cfg.max_shift, base_image_seq_len=cfg.base_seq_len,
                    max_image_seq_len=cfg.max_seq_len, time_shift_type="exponential")
    if seq_len is None:
        raise ValueError(f"flow.shift_mode={cfg.shift_mode!r} with flow.shift={cfg.shift} has no diffusers scheduler "
                         "equivalent for every size: give the image sequence length to fix the shift at")
    return dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=schedule.shift_for(seq_len), use_dynamic_shifting=False)


class PipelineGrid:
    """The times a diffusers pipeline walks and the timesteps its transformer sees, reproduced to the last bit, so
    that flowmatch's Euler sampler from the same folder gives the pipeline's images.

    diffusers holds sigmas and timesteps in float32 (964.28564 for 964.28571), and with random tiny weights that
    rounding alone moves images by several 1e-3; so the grid comes from a `FlowMatchEulerDiscreteScheduler` built
    from the pipeline's own scheduler config, called as the pipeline calls it:

    How each pipeline calls it is its family's (``Family.diffusers.schedule``, :mod:`flowmatch.families`):

    - ``sd3``: ``set_timesteps(N, sigmas=sigmas)`` (None: the scheduler's default grid, see the module), with
      ``mu`` from the image sequence length only for a dynamic-shift config; the transformer gets ``sigma * 1000``
      in float32, which is what flowmatch's MMDiT computes from ``t = sigma``.
    - ``flux``: ``sigmas`` default ``linspace(1, 1/N, N)`` and ``mu`` from the packed image sequence length; the
      transformer gets ``(sigma * 1000) / 1000`` in float32 and multiplies by 1000 again, so :meth:`model_time`
      rounds t the same way.

    Args:
        scheduler_config: the pipeline's scheduler/scheduler_config.json as a mapping.
        pipeline: the pipeline class (``Flux2Pipeline``; :data:`flowmatch.families.PIPELINES`), or the family
            whose default pipeline it is (``sd3``, ``flux``: one with a diffusers pipeline).
    """

    def __init__(self, scheduler_config: dict[str, Any], pipeline: str) -> None:
        self.config = dict(scheduler_config)
        self.pipeline = pipeline
        self.schedule = diffusers_pipeline(pipeline).schedule
        """How the family's pipeline walks the scheduler."""
        self.classifier_free = self.schedule.classifier_free
        """Whether the pipeline's guidance scale is classifier-free guidance (SD3), not a model input (FLUX)."""

    def mu(self, seq_len: int) -> float:
        """The pipeline's ``mu`` for `seq_len` image tokens (diffusers' calculate_shift with its defaults)."""
        c = self.config
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", self.schedule.max_shift)
        slope = (top - base) / (max_len - base_len)
        return seq_len * slope + (base - slope * base_len)

    def grid(self, steps: int, *, seq_len: int, sigmas: Optional[list[float]] = None,
             channels: Optional[int] = None) -> list[float]:
        """The ``steps + 1`` sigmas (float32 values, last 0) the pipeline walks for images of `seq_len` tokens of
        `channels` latent channels (which take the sequence length's place in ``mu`` where the pipeline does so)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        steps = check_steps(steps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        if self.schedule.default_sigmas and sigmas is None and not self.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        dynamic = bool(self.config.get("use_dynamic_shifting"))
        if sigmas is not None and len(sigmas) != steps:
            raise ValueError(f"sigmas= must hold one value per step ({steps}), got {len(sigmas)}")
        mu = (self.schedule.mu(seq_len, steps) if self.schedule.mu is not None
              else self.mu(self._mu_length(seq_len, channels)))
        scheduler.set_timesteps(steps, sigmas=None if sigmas is None else list(sigmas), mu=mu if dynamic else None)
        return scheduler.sigmas.double().tolist()

    def _mu_length(self, seq_len: int, channels: Optional[int]) -> int:
        """The length the pipeline computes ``mu`` from: the image's tokens, or its latent channels."""
        if not self.schedule.mu_from_channels:
            return seq_len
        if channels is None:
            raise ValueError(f"the {self.pipeline} pipeline computes mu from the latent channels: pass channels=")
        return channels

    def model_time(self, t):
        """t (B,) float32 as the pipeline's transformer ends up embedding it (divided by 1000 after scaling)."""
        if self.schedule.time_rounded:
            return (t.float() * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
        return t
