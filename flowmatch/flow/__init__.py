"""Rectified-flow math: the path and its one time convention, time distributions and shift, the loss, caption
dropout for classifier-free guidance, and the few-step objectives (MeanFlow, shortcut) with guidance as an input.

Convention (see :mod:`flowmatch.flow.path`): t = 0 data, t = 1 noise, ``x_t = (1 - t) x0 + t noise``,
velocity ``noise - x0``. Diffusion formulations on the same convention (VP paths, eps / v / x0 prediction, their
loss weightings) live in :mod:`.paths`, :mod:`.parameterization`, :mod:`.weighting` and :mod:`.formulation`.
"""

from flowmatch.flow.caption_dropout import drop_captions
from flowmatch.flow.formulation import Formulation
from flowmatch.flow.guided import GuidanceInputConfig, with_guidance
from flowmatch.flow.jvp import JVP_BACKENDS, time_derivative
from flowmatch.flow.loss import LOSS_WEIGHTINGS, LossOutput, flow_matching_loss, loss_weight
from flowmatch.flow.meanflow import MeanFlowConfig
from flowmatch.flow.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveLoss,
    ObjectiveModels,
    get_objective,
    objective_loss,
)
from flowmatch.flow.path import (
    PathSample,
    interpolate,
    noise_from_velocity,
    sample_path,
    velocity_from_noise,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)
from flowmatch.flow.shortcut import ShortcutConfig
from flowmatch.flow.timesteps import (
    SHIFT_MODES,
    TIME_DISTRIBUTIONS,
    FlowConfig,
    TimeSchedule,
    shift_time,
    shifted_grid,
)

__all__ = [
    "FlowConfig",
    "Formulation",
    "GuidanceInputConfig",
    "JVP_BACKENDS",
    "MeanFlowConfig",
    "OBJECTIVES",
    "Objective",
    "ObjectiveLoss",
    "ObjectiveModels",
    "ShortcutConfig",
    "get_objective",
    "objective_loss",
    "time_derivative",
    "with_guidance",
    "LOSS_WEIGHTINGS",
    "LossOutput",
    "PathSample",
    "SHIFT_MODES",
    "TIME_DISTRIBUTIONS",
    "TimeSchedule",
    "drop_captions",
    "flow_matching_loss",
    "interpolate",
    "loss_weight",
    "noise_from_velocity",
    "sample_path",
    "shift_time",
    "shifted_grid",
    "velocity_from_noise",
    "velocity_from_x0",
    "velocity_target",
    "x0_from_velocity",
]
