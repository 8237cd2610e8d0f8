"""Sampling from a flow model: ODE solvers, few-step jumps of average-velocity models, classifier-free guidance,
exact likelihood.

Every function takes a plain velocity callable ``velocity(x, t)`` (x (B, ...), t (B,)), so the CLI, validation
during training and the Python API share one implementation.
"""

from flowmatch.sampling.fewstep import sample_average
from flowmatch.sampling.generate import (
    GenerationConfig,
    Pipeline,
    SamplingConfig,
    VelocityModel,
    image_noise,
    sample_latents,
)
from flowmatch.sampling.guidance import guided_velocity
from flowmatch.sampling.likelihood import (
    PIXEL_DATA_SCALE_CORRECTION,
    PIXEL_LEVEL_SCALE,
    bits_per_dim,
    dequantize_pixels,
    log_likelihood,
    standard_normal_log_prob,
    velocity_and_divergence,
    velocity_and_trace_estimate,
)
from flowmatch.sampling.solvers import (
    ADAPTIVE_SOLVERS,
    AVERAGE_SOLVER,
    FIXED_STEP_SOLVERS,
    SOLVERS,
    FixedStepSolver,
    ODESolution,
    Velocity,
    available_solvers,
    check_solver,
    nfe_per_step,
    sample_ode,
    solver_order,
    steps_for_nfe,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "AVERAGE_SOLVER",
    "FIXED_STEP_SOLVERS",
    "FixedStepSolver",
    "GenerationConfig",
    "ODESolution",
    "PIXEL_DATA_SCALE_CORRECTION",
    "PIXEL_LEVEL_SCALE",
    "Pipeline",
    "SOLVERS",
    "SamplingConfig",
    "Velocity",
    "VelocityModel",
    "available_solvers",
    "check_solver",
    "bits_per_dim",
    "dequantize_pixels",
    "guided_velocity",
    "image_noise",
    "log_likelihood",
    "nfe_per_step",
    "sample_latents",
    "sample_average",
    "sample_ode",
    "solver_order",
    "standard_normal_log_prob",
    "steps_for_nfe",
    "velocity_and_divergence",
    "velocity_and_trace_estimate",
]
