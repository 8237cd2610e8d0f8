"""The training side of the objectives (:mod:`flowmatch.flow.objectives`): the model callables each one needs,
the frozen teacher of distillation, and the recipe rules that span sections (starting from another run's weights is
``model.init_from``, :mod:`flowmatch.init_from`, which starts the inputs a flow checkpoint lacks at zero).

The loss's own forward always goes through the engine, so DeepSpeed's hooks (ZeRO-3 gathering, gradient
reduction) see it exactly as in flow matching. The extra forwards that only build targets carry no gradient:
the exact JVP runs on the unwrapped module with detached fp32 weights (never under ZeRO-3), everything else
through the engine under ``torch.no_grad``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.errors import RecipeError
from flowmatch.families import build_backbone, family_of
from flowmatch.flow import ObjectiveModels, get_objective
from flowmatch.flow.jvp import fp32_call
from flowmatch.run import open_run

if TYPE_CHECKING:
    from flowmatch.config import Recipe
    from flowmatch.engine import Engine
    from flowmatch.training.assembly import EngineVelocity

def check_recipe(recipe: "Recipe") -> None:
    """Rules across sections for the few-step objectives; each RecipeError names the key and a valid value."""
    flow, model = recipe.flow, recipe.model
    objective, family = get_objective(flow.objective), family_of(model)
    rectified = flow.path == "rectified" and flow.prediction == "velocity"
    if objective.interval and not (rectified and flow.min_snr_gamma == 0):
        raise RecipeError(f"flow.objective: {flow.objective} is written for the rectified path's velocity; it cannot "
                          f"train flow.path: {flow.path} with flow.prediction: {flow.prediction} and "
                          f"flow.min_snr_gamma: {flow.min_snr_gamma:g} (use flow.objective: flow, or flow.path: "
                          "rectified, flow.prediction: velocity, flow.min_snr_gamma: 0)")
    if flow.teacher is not None and not rectified:
        raise RecipeError(f"flow.teacher distils a rectified-flow velocity; it cannot train flow.path: {flow.path} "
                          f"with flow.prediction: {flow.prediction} (remove flow.teacher, or use flow.path: rectified, "
                          "flow.prediction: velocity)")
    if flow.teacher_steps and (flow.teacher is None or not objective.interval):
        raise RecipeError(f"flow.teacher_steps: {flow.teacher_steps} distils the teacher's solve into the interval "
                          "rows of a few-step objective: set flow.teacher and flow.objective: meanflow or shortcut (or "
                          "flow.teacher_steps: 0)")
    if objective.interval and not family.capabilities.interval_embed:
        raise RecipeError(f"flow.objective: {flow.objective} needs the interval input r, which only model.kind: mmdit "
                          f"has (model.interval_embed); this recipe has model.kind: {model.kind} (model.family: "
                          f"{family.name})")
    if objective.interval and not model.interval_embed:
        raise RecipeError(f"flow.objective: {flow.objective} trains an average velocity over [r, t]: set "
                          "model.interval_embed: true (or flow.objective: flow)")
    if objective.uses_jvp and jvp_backend(recipe) == "exact":
        if recipe.distributed.zero_stage == 3:
            raise RecipeError("flow.meanflow.jvp: exact cannot run under ZeRO-3 (functorch transforms break its "
                              "parameter gathering): use flow.meanflow.jvp: finite_difference (or auto)")
        if recipe.train.activation_checkpointing or recipe.train.compile:
            raise RecipeError("flow.meanflow.jvp: exact is not supported with train.activation_checkpointing or "
                              "train.compile: use flow.meanflow.jvp: finite_difference")


def jvp_backend(recipe: "Recipe") -> str:
    """The JVP backend of this run (``flow.meanflow.jvp``, auto resolved by the ZeRO stage); "none" when
    flow-map distillation (``flow.teacher_steps``) replaces the MeanFlow identity's target."""
    if recipe.flow.teacher_steps:
        return "none"
    return recipe.flow.meanflow.backend(recipe.distributed.zero_stage)


def objective_models(velocity: "EngineVelocity", engine: "Engine", *, exact_jvp: bool,
                     teacher: Optional[Callable[[Tensor, Tensor, Conditioning], Tensor]] = None) -> ObjectiveModels:
    """The callables :func:`~flowmatch.flow.objective_loss` needs: the engine's model with gradients
    (``velocity``), the same without, the detached fp32 module for the exact JVP (``exact_jvp``), the teacher."""

    def frozen(x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor] = None) -> Tensor:
        with torch.no_grad():
            return velocity(x, t, cond, r=r)

    return ObjectiveModels(student=velocity, frozen=frozen, tangent=detached_fp32(engine) if exact_jvp else None,
                           teacher=teacher)


def detached_fp32(engine: "Engine") -> Callable[..., Tensor]:
    """The engine's unwrapped model as a plain function of its inputs, on detached fp32 copies of its weights:
    what :func:`torch.func.jvp` differentiates (no parameter gradients, forward-mode in fp32)."""

    def u(x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor] = None) -> Tensor:
        return fp32_call(engine.module, x, t, cond, r)

    return u



def _checkpoint_model(path: str, what: str) -> tuple["Recipe", dict[str, Tensor]]:
    """The resolved recipe and default weights of a run or checkpoint directory (verified against its manifest)."""
    if not Path(path).exists():
        raise RecipeError(f"{what}: {path!r} does not exist; give a run directory or RUN_DIR/checkpoints/<step>")
    run = open_run(path)
    return run.recipe, run.weights


def load_teacher(recipe: "Recipe", device: torch.device) -> Optional[Callable[[Tensor, Tensor, Conditioning], Tensor]]:
    """The frozen teacher of ``flow.teacher`` as ``teacher(x, t, cond) -> v`` (fp32, no gradients), or None.

    It must read the same encoders as the student (its inputs are the student's)."""
    if recipe.flow.teacher is None:
        return None
    teacher_recipe, weights = _checkpoint_model(recipe.flow.teacher, "flow.teacher")
    for section in ("text_encoder", "autoencoder"):
        if getattr(teacher_recipe, section) != getattr(recipe, section):
            raise RecipeError(f"flow.teacher: {recipe.flow.teacher!r} was trained with another {section} section; "
                              f"the teacher must read the student's inputs (copy its {section} section)")
    if teacher_recipe.model.guidance_embed or teacher_recipe.model.interval_embed:
        raise RecipeError(f"flow.teacher: {recipe.flow.teacher!r} is not an ordinary flow model (it takes a "
                          "guidance or interval input); distill from a flow.objective: flow run")
    model = build_backbone(teacher_recipe.model)
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)

    def teacher(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return model(x.float(), t.float(), cond.to(dtype=torch.float32)).float()

    return teacher
