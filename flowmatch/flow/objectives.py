"""The training objectives, one loss per micro batch: ``flow.objective: flow | meanflow | shortcut``.

Each is an :class:`Objective` registered in :data:`OBJECTIVES`; the trainer and the recipe checks ask it (does it
train an interval, does it need a JVP, its log line) and never compare its name.

Each draws its times, builds its targets from the path of :mod:`flowmatch.flow.path` (t = 0 data, t = 1 noise)
and returns one loss; the model enters only as callables, so this layer stays model-agnostic:

- ``flow``: rectified flow, the model's velocity at (x_t, t) regresses ``noise - x0`` (:mod:`.loss`); on another
  formulation (``flow.path``, ``flow.prediction``, ``flow.min_snr_gamma``) x_t, the target and the loss factor come
  from :class:`~flowmatch.flow.formulation.Formulation`, whose default takes exactly the rectified-flow code;
- ``meanflow``: the average velocity over [r, t] regresses ``v - (t - r) du/dt`` (:mod:`.meanflow`, :mod:`.jvp`);
- ``shortcut``: the average velocity of a step regresses two half steps of the model (:mod:`.shortcut`).

With a teacher and ``flow.teacher_steps > 0`` both few-step objectives' interval rows regress the teacher's own
solve over the interval instead (flow-map distillation, :mod:`.flowmap`).

The few-step objectives are written for the rectified path's velocity only (``flowmatch.training.fewstep``
rejects them with another formulation).

Two options change the velocity v that all three regress (:mod:`.guided`): a model that takes the guidance
scale learns the guided field, and a frozen teacher replaces ``noise - x0`` by its guided velocity (distillation).

Randomness comes from one generator in a fixed order: caption dropout, noise, t, then the objective's draws
(the second time, the guidance scale). ``flow`` without guidance or teacher draws exactly what it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.errors import choice_error
from flowmatch.flow.caption_dropout import drop_captions
from flowmatch.flow.flowmap import teacher_average_velocity
from flowmatch.flow.formulation import Formulation
from flowmatch.flow.guided import draw_guidance, guided_teacher_velocity, mix_guidance, with_guidance
from flowmatch.flow.jvp import time_derivative
from flowmatch.flow.loss import flow_matching_loss
from flowmatch.flow.meanflow import adaptive_loss, interval_count, meanflow_target, order_times
from flowmatch.flow.shortcut import bootstrap_target, consistency_times

if TYPE_CHECKING:
    from flowmatch.encoders.combine import TextPart
    from flowmatch.flow.timesteps import FlowConfig, TimeSchedule

__all__ = ["OBJECTIVES", "Objective", "ObjectiveLoss", "ObjectiveModels", "get_objective", "objective_loss"]

Model = Callable[..., Tensor]
"""``model(x (B, ...), t (B,), cond, r=r (B,)) -> (B, ...)``: the average velocity over [r, t]; called without
``r`` for the instantaneous velocity (r = t), so an ordinary ``velocity(x, t, cond)`` serves the flow objective."""


@dataclass
class ObjectiveModels:
    """The callables one objective step uses (all float32 out)."""

    student: Model
    """The trained model, with gradients (through the engine, whose hooks see the backward)."""
    frozen: Optional[Model] = None
    """The same weights without gradients: self-made targets (unconditional velocity, half steps, finite
    differences). Needed by meanflow, shortcut and guidance from data."""
    tangent: Optional[Model] = None
    """A plain function of its inputs with detached weights, for the exact JVP (meanflow with jvp: exact)."""
    teacher: Optional[Callable[[Tensor, Tensor, Conditioning], Tensor]] = None
    """A frozen flow model ``teacher(x, t, cond) -> v`` whose guided velocity replaces noise - x0."""


@dataclass
class ObjectiveLoss:
    """One micro batch's loss."""

    loss: Tensor
    """() scalar to backpropagate."""
    per_sample: Tensor
    """(B,) per-sample squared error, detached (for logging against t)."""
    t: Tensor
    """(B,) the times the model saw."""


def _call(model: Model, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor]) -> Tensor:
    return model(x, t, cond) if r is None else model(x, t, cond, r=r)


def _bind(model: Model, cond: Conditioning) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda x, t, r: model(x, t, cond, r=r)


class Objective:
    """What the trainer and the recipe checks ask of an objective (one instance per entry of :data:`OBJECTIVES`);
    :func:`objective_loss` calls its steps. The base class is rectified flow's (``flow``)."""

    name = "flow"
    interval = False
    """It trains an average velocity over [r, t] (a few-step objective): the model needs its interval input
    (``model.interval_embed``), and the targets are written for the rectified path's velocity."""
    uses_jvp = False
    """Its target differentiates the model in t (a JVP, ``flow.meanflow.jvp``)."""

    def interval_rows(self, batch: int, flow: "FlowConfig") -> int:
        """How many of ``batch`` rows get self-made targets (the n of :meth:`times`)."""
        return 0

    def times(self, t: Tensor, *, flow: "FlowConfig", schedule: "TimeSchedule", seq_len: int,
              generator: torch.Generator) -> tuple[int, Tensor, Optional[Tensor]]:
        """(n, t, r): the rows with self-made targets come first (n of them), with their interval starts r (None:
        r = t everywhere). Draws from ``generator`` after the noise and t."""
        return 0, t, None

    def target(self, models: "ObjectiveModels", cond: Conditioning, x_t: Tensor, t: Tensor, r: Tensor, v: Tensor, *,
               flow: "FlowConfig", jvp_backend: str) -> Tensor:
        """The self-made target of the n interval rows (``cond`` their conditioning, ``v`` their velocity)."""
        raise NotImplementedError(f"objective {self.name} has no interval rows")

    def loss(self, pred: Tensor, target: Tensor, t: Tensor, flow: "FlowConfig") -> ObjectiveLoss:
        """The loss of the interval objectives' prediction against their targets."""
        out = flow_matching_loss(pred, target, t)
        return ObjectiveLoss(out.loss, out.per_sample.detach(), t)

    def describe(self, jvp_backend: str) -> str:
        """One line for the training log."""
        return f"objective {self.name}"


class MeanFlow(Objective):
    """The average velocity over [r, t] regresses ``v - (t - r) du/dt`` (:mod:`.meanflow`, :mod:`.jvp`)."""

    name = "meanflow"
    interval = True
    uses_jvp = True

    def interval_rows(self, batch, flow):
        return interval_count(batch, flow.meanflow.interval_fraction)

    def times(self, t, *, flow, schedule, seq_len, generator):
        n = self.interval_rows(t.shape[0], flow)
        t, r = order_times(t, schedule.sample(t.shape[0], seq_len=seq_len, generator=generator).to(t.device), n)
        return n, t, r

    def target(self, models, cond, x_t, t, r, v, *, flow, jvp_backend):
        # The JVP runs on the interval rows only: at r = t the target is v.
        tangent_model = models.tangent if jvp_backend == "exact" else models.frozen
        u = _bind(_need(tangent_model, f"the {jvp_backend} JVP"), cond)
        du_dt = time_derivative(u, x_t, t, r, v, backend=jvp_backend, step=flow.meanflow.fd_step)
        return meanflow_target(v, du_dt, t, r)

    def loss(self, pred, target, t, flow):
        loss, per_sample = adaptive_loss(pred, target, power=flow.meanflow.adaptive_power,
                                         eps=flow.meanflow.adaptive_eps)
        return ObjectiveLoss(loss, per_sample, t)

    def describe(self, jvp_backend):
        return f"objective {self.name}, JVP backend {jvp_backend}"


class Shortcut(Objective):
    """The average velocity of a step regresses two half steps of the model (:mod:`.shortcut`)."""

    name = "shortcut"
    interval = True

    def interval_rows(self, batch, flow):
        return interval_count(batch, flow.shortcut.consistency_fraction)

    def times(self, t, *, flow, schedule, seq_len, generator):
        n = self.interval_rows(t.shape[0], flow)
        t_sc, r_sc = consistency_times(n, flow.shortcut.levels, generator=generator)
        return n, torch.cat([t_sc.to(t.device), t[n:]]), torch.cat([r_sc.to(t.device), t[n:]])

    def target(self, models, cond, x_t, t, r, v, *, flow, jvp_backend):
        u = _bind(_need(models.frozen, "shortcut targets"), cond)
        return bootstrap_target(u, x_t, t, r, levels=flow.shortcut.levels)


#: Every objective by its ``flow.objective`` name: a new one is a subclass of :class:`Objective` and one entry here.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (Objective(), MeanFlow(), Shortcut())}


def get_objective(name: str) -> Objective:
    """The objective ``flow.objective`` names; ValueError naming the objectives and the nearest spelling."""
    if name not in OBJECTIVES:
        raise choice_error("flow.objective", name, OBJECTIVES)
    return OBJECTIVES[name]


def objective_loss(models: ObjectiveModels, x0: Tensor, cond: Conditioning, null: Conditioning, *,
                   schedule: "TimeSchedule", flow: "FlowConfig", seq_len: int, generator: torch.Generator,
                   guided: bool = False, jvp_backend: str = "exact",
                   dropout_parts: Optional[Sequence[tuple["TextPart", float]]] = None,
                   mask: Optional[Tensor] = None) -> ObjectiveLoss:
    """The loss of ``flow.objective`` on data x0 (B, C, h, w) with its conditioning.

    ``null`` is the empty caption's conditioning (caption dropout's replacement and the unconditional input);
    ``seq_len`` the image tokens (for the time shift); ``guided`` whether the model takes a guidance scale
    (``cond.extra["guidance"]``); ``jvp_backend`` the meanflow backend (:data:`~flowmatch.flow.jvp.JVP_BACKENDS`);
    ``dropout_parts`` each text encoder's share of ``cond`` with its own dropout (:func:`drop_captions`);
    ``mask`` (B, 1, H, W) in [0, 1] the region each sample's loss averages over (None = all; ``flow`` only).
    """
    objective = get_objective(flow.objective)
    if mask is not None and objective.interval:
        raise ValueError(f"a masked loss (the samples' masks) applies to flow.objective flow, not "
                         f"{flow.objective}: train without masks (remove the .mask.png files or alpha channels)")
    cond = drop_captions(cond, null, flow.caption_dropout, generator=generator, parts=dropout_parts)
    b, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = schedule.sample(b, seq_len=seq_len, generator=generator).to(device)
    # rows with self-made targets come first: r < t (meanflow), self-consistency (shortcut)
    n, t, r = objective.times(t, flow=flow, schedule=schedule, seq_len=seq_len, generator=generator)
    w = draw_guidance(b, flow.guidance, generator=generator).to(device) if guided else None

    formulation = Formulation(flow)
    path = formulation.training_sample(x0, noise, t)  # sample_path's exactly on the rectified path
    x_t, t, v = path.x_t, path.t, path.target.float()
    jump: Optional[Tensor] = None  # flow-map distillation: the teacher's average velocity on the interval rows
    if models.teacher is not None:
        scale = w if w is not None else torch.ones_like(t)
        v = guided_teacher_velocity(models.teacher, x_t, t, cond, null, scale)
        if flow.teacher_steps and n:
            plain, teacher = cond.rows(n), models.teacher
            jump = teacher_average_velocity(
                lambda x, s: guided_teacher_velocity(teacher, x, s, plain, null, scale[:n]),
                x_t[:n], t[:n], r[:n], steps=flow.teacher_steps, v0=v[:n])
    elif guided:
        unconditional = with_guidance(cond.unconditional(null), 1.0)
        v_uncond = _call(_need(models.frozen, "guidance from data"), x_t, t, unconditional, None)
        v = mix_guidance(v, v_uncond.float(), w).detach()
    if guided:
        cond = with_guidance(cond, w)

    if not objective.interval:
        out = formulation.reweight(schedule.loss(_call(models.student, x_t, t, cond, None), v, t, mask), t)
        return ObjectiveLoss(out.loss, out.per_sample.detach(), t)
    target = v
    if jump is not None:
        target = torch.cat([jump, v[n:]])
    elif n:
        own = objective.target(models, cond.rows(n), x_t[:n], t[:n], r[:n], v[:n], flow=flow,
                               jvp_backend=jvp_backend)
        target = torch.cat([own, v[n:]])
    return objective.loss(_call(models.student, x_t, t, cond, r), target, t, flow)


def _need(model, what: str):
    if model is None:
        raise ValueError(f"{what} needs a model callable that ObjectiveModels was built without")
    return model
