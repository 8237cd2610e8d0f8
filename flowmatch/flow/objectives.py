"""The training objectives, one loss per micro batch: ``flow.objective: flow | meanflow | shortcut``.

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

__all__ = ["OBJECTIVES", "ObjectiveLoss", "ObjectiveModels", "objective_loss"]

OBJECTIVES = ("flow", "meanflow", "shortcut")

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


def _rows(cond: Conditioning, n: int) -> Conditioning:
    """The first ``n`` rows of ``cond``."""
    return Conditioning(cond.hidden[:n], cond.mask[:n], cond.pooled[:n], {k: v[:n] for k, v in cond.extra.items()})


def _call(model: Model, x: Tensor, t: Tensor, cond: Conditioning, r: Optional[Tensor]) -> Tensor:
    return model(x, t, cond) if r is None else model(x, t, cond, r=r)


def _bind(model: Model, cond: Conditioning) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda x, t, r: model(x, t, cond, r=r)


def objective_loss(models: ObjectiveModels, x0: Tensor, cond: Conditioning, null: Conditioning, *,
                   schedule: "TimeSchedule", flow: "FlowConfig", seq_len: int, generator: torch.Generator,
                   guided: bool = False, jvp_backend: str = "exact",
                   dropout_parts: Optional[Sequence[tuple["TextPart", float]]] = None) -> ObjectiveLoss:
    """The loss of ``flow.objective`` on data x0 (B, C, h, w) with its conditioning.

    ``null`` is the empty caption's conditioning (caption dropout's replacement and the unconditional input);
    ``seq_len`` the image tokens (for the time shift); ``guided`` whether the model takes a guidance scale
    (``cond.extra["guidance"]``); ``jvp_backend`` the meanflow backend (:data:`~flowmatch.flow.jvp.JVP_BACKENDS`);
    ``dropout_parts`` each text encoder's share of ``cond`` with its own dropout (:func:`drop_captions`).
    """
    cond = drop_captions(cond, null, flow.caption_dropout, generator=generator, parts=dropout_parts)
    b, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = schedule.sample(b, seq_len=seq_len, generator=generator).to(device)
    r: Optional[Tensor] = None
    n = 0  # rows with self-made targets come first: r < t (meanflow), self-consistency (shortcut)
    if flow.objective == "meanflow":
        n = interval_count(b, flow.meanflow.interval_fraction)
        t, r = order_times(t, schedule.sample(b, seq_len=seq_len, generator=generator).to(device), n)
    elif flow.objective == "shortcut":
        n = interval_count(b, flow.shortcut.consistency_fraction)
        t_sc, r_sc = consistency_times(n, flow.shortcut.levels, generator=generator)
        t, r = torch.cat([t_sc.to(device), t[n:]]), torch.cat([r_sc.to(device), t[n:]])
    w = draw_guidance(b, flow.guidance, generator=generator).to(device) if guided else None

    formulation = Formulation(flow)
    path = formulation.training_sample(x0, noise, t)  # sample_path's exactly on the rectified path
    x_t, t, v = path.x_t, path.t, path.target.float()
    jump: Optional[Tensor] = None  # flow-map distillation: the teacher's average velocity on the interval rows
    if models.teacher is not None:
        scale = w if w is not None else torch.ones_like(t)
        v = guided_teacher_velocity(models.teacher, x_t, t, cond, null, scale)
        if flow.teacher_steps and n:
            plain, teacher = _rows(cond, n), models.teacher
            jump = teacher_average_velocity(
                lambda x, s: guided_teacher_velocity(teacher, x, s, plain, null, scale[:n]),
                x_t[:n], t[:n], r[:n], steps=flow.teacher_steps, v0=v[:n])
    elif guided:
        unconditional = with_guidance(null.expand(b), 1.0)
        v_uncond = _call(_need(models.frozen, "guidance from data"), x_t, t, unconditional, None)
        v = mix_guidance(v, v_uncond.float(), w).detach()
    if guided:
        cond = with_guidance(cond, w)

    if flow.objective == "flow":
        out = formulation.reweight(schedule.loss(_call(models.student, x_t, t, cond, None), v, t), t)
        return ObjectiveLoss(out.loss, out.per_sample.detach(), t)
    head = _rows(cond, n)
    target = v
    if jump is not None:
        target = torch.cat([jump, v[n:]])
    elif n and flow.objective == "meanflow":  # the JVP runs on the interval rows only: at r = t the target is v
        tangent_model = models.tangent if jvp_backend == "exact" else models.frozen
        u = _bind(_need(tangent_model, f"the {jvp_backend} JVP"), head)
        du_dt = time_derivative(u, x_t[:n], t[:n], r[:n], v[:n], backend=jvp_backend, step=flow.meanflow.fd_step)
        target = torch.cat([meanflow_target(v[:n], du_dt, t[:n], r[:n]), v[n:]])
    elif n:
        u = _bind(_need(models.frozen, "shortcut targets"), head)
        target = torch.cat([bootstrap_target(u, x_t[:n], t[:n], r[:n], levels=flow.shortcut.levels), v[n:]])
    pred = _call(models.student, x_t, t, cond, r)
    if flow.objective == "meanflow":
        loss, per_sample = adaptive_loss(pred, target, power=flow.meanflow.adaptive_power,
                                         eps=flow.meanflow.adaptive_eps)
        return ObjectiveLoss(loss, per_sample, t)
    out = flow_matching_loss(pred, target, t)
    return ObjectiveLoss(out.loss, out.per_sample.detach(), t)


def _need(model, what: str):
    if model is None:
        raise ValueError(f"{what} needs a model callable that ObjectiveModels was built without")
    return model
