"""Guidance as a model input: training a model that takes the classifier-free guidance scale w, so that one
forward at sampling gives the guided velocity (no second, unconditional pass; what makes 1-step samples guided).

The guided field is ``v_w = v_uncond + w (v_cond - v_uncond)`` (Ho & Salimans 2022). A model with
``model.guidance_embed`` reads w from ``cond.extra["guidance"]`` (B,). Training draws w per sample uniformly from
``flow.guidance`` and regresses the guided velocity, estimated one of two ways:

- from data (MeanFlow's section 4.2): ``w (noise - x0) + (1 - w) sg(u(x_t, t, t | empty caption, w = 1))``: the
  sample velocity stands in for the conditional field and the model's own unconditional prediction for the
  unconditional one (caption dropout keeps training that one);
- from a frozen teacher (distillation): ``v_w`` exactly, from one teacher forward on [cond; empty caption].

Rows whose caption was dropped get the same treatment: their conditional field is the unconditional one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.conditioning import Conditioning
from flowmatch.flow.path import expand_time

__all__ = ["GUIDANCE_INPUT", "GuidanceInputConfig", "draw_guidance", "guided_teacher_velocity", "mix_guidance",
           "with_guidance"]

GUIDANCE_INPUT = "guidance"
"""The key of ``Conditioning.extra`` that carries the guidance scale (B,), as the MMDiT reads it."""


@dataclass
class GuidanceInputConfig:
    """The recipe's ``flow.guidance`` section: the scales a guidance-conditioned model (model.guidance_embed) is
    trained on; sampling may ask for any scale in this range."""

    low: float = 1.0
    """Smallest guidance scale drawn in training (1 = the unguided conditional field)."""
    high: float = 3.0
    """Largest guidance scale drawn in training; scales are drawn uniformly in [low, high]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high:
            raise ValueError(f"flow.guidance needs 0 <= low <= high; got low={self.low}, high={self.high}")


def with_guidance(cond: Conditioning, scale: Tensor | float) -> Conditioning:
    """``cond`` with ``extra["guidance"]`` set to ``scale`` (a float, or (B,)), float32 on cond's device."""
    b, device = len(cond), cond.hidden.device
    w = torch.as_tensor(scale, dtype=torch.float32, device=device)
    w = w.expand(b) if w.ndim == 0 else w.to(device)
    return cond.with_extra({**cond.extra, GUIDANCE_INPUT: w})


def draw_guidance(n: int, cfg: GuidanceInputConfig, *, generator: torch.Generator | None = None) -> Tensor:
    """(n,) float32 guidance scales, uniform in [cfg.low, cfg.high], drawn on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(n, generator=generator, device=device)
    return cfg.low + (cfg.high - cfg.low) * u


def mix_guidance(v_cond: Tensor, v_uncond: Tensor, w: Tensor) -> Tensor:
    """``v_uncond + w (v_cond - v_uncond)`` with a per-sample scale w (B,); v (B, ...)."""
    return v_uncond + expand_time(w.to(v_cond), v_cond) * (v_cond - v_uncond)


def guided_teacher_velocity(teacher: Callable[[Tensor, Tensor, Conditioning], Tensor], x: Tensor, t: Tensor,
                            cond: Conditioning, null: Conditioning, w: Tensor) -> Tensor:
    """The teacher's guided velocity at scale w (B,) from ONE forward on [cond; null] (batch 2B); detached.

    ``cond`` must carry no guidance input (the teacher is an ordinary flow model); ``null`` has batch 1 or B.
    """
    plain = cond.with_extra({k: v for k, v in cond.extra.items() if k != GUIDANCE_INPUT})
    both = Conditioning.cat([plain, plain.unconditional(null)])
    with torch.no_grad():
        v_cond, v_uncond = teacher(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
    return mix_guidance(v_cond, v_uncond, w).detach()
