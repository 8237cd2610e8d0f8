"""A recipe's model as the planner counts it: the frozen parts' sizes (:mod:`flowmatch.plan.frozen`), the model
built on the meta device by its family with its LoRA adapters, its activations traced at the recipe's sequence
length (:mod:`flowmatch.plan.trace`) for micro batches 1 and 2, each optimizer's state on its trained shapes, and
what a few-step objective holds while it makes its own targets for 1 and 2 rows (:mod:`flowmatch.plan.live`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from flowmatch.conditioning import Conditioning
from flowmatch.config import Recipe
from flowmatch.dtypes import DTYPES
from flowmatch.encoders.combine import combine_outputs
from flowmatch.engine.optimizers import OPTIMIZER_NAMES
from flowmatch.families import build_backbone, family_of, text_layout
from flowmatch.families.lora import apply_lora
from flowmatch.flow import ObjectiveModels, get_objective
from flowmatch.flow.jvp import fp32_call
from flowmatch.plan import frozen
from flowmatch.plan.live import live_peak
from flowmatch.plan.memory import ModelCost
from flowmatch.plan.trace import FusedAttention, count_params, optimizer_state_bytes, trace_activations


@dataclass(frozen=True)
class SampleShape:
    """The token counts one sample puts through the model."""

    image_tokens: int
    text_tokens: int
    latent: tuple[int, int, int]
    """(channels, height, width) of the model's input."""
    references: int = 0
    """Reference images per sample (paired data for a family that takes them), each of the target's latent size."""

    @property
    def reference_tokens(self) -> int:
        """Image tokens the references add to the image stream."""
        return self.references * self.image_tokens


def _conditioning(recipe: Recipe, shapes: dict[str, frozen.TextShape], batch: int) -> Conditioning:
    """The model's conditioning of ``batch`` captions at the encoders' max_length, combined as the recipe combines
    it; a model that embeds a guidance value gets one (guided distillation feeds it from the objective)."""
    text = recipe.text
    outputs = {name: Conditioning(torch.zeros(batch, s.tokens, s.hidden), torch.ones(batch, s.tokens, dtype=torch.bool),
                                  torch.zeros(batch, s.pooled)) for name, s in shapes.items()}
    cond = combine_outputs(text_layout(text.combine), outputs, {n: s.kind for n, s in shapes.items()}, text.guidance)
    if getattr(recipe.model, "guidance_embed", False) and "guidance" not in cond.extra:
        cond = Conditioning(cond.hidden, cond.mask, cond.pooled, {**cond.extra, "guidance": torch.ones(batch)})
    return cond


def _quantisable(model: nn.Module) -> int:
    """Frozen elements of the linear layers' weights."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad)


def _conditioning_bytes(recipe: Recipe, shapes: dict[str, frozen.TextShape], batch: int) -> int:
    with torch.device("meta"):
        cond = _conditioning(recipe, shapes, batch).to(dtype=DTYPES[recipe.distributed.precision])
    return sum(t.nbytes for t in (cond.hidden, cond.mask, cond.pooled))


def _target_cost(recipe: Recipe, model: nn.Module, shapes: dict[str, frozen.TextShape], latent: tuple[int, ...],
                 dtype: torch.dtype) -> Optional[tuple[int, int]]:
    """Bytes alive at once while ``flow.objective`` makes its own targets for 1 and 2 rows (the objective's own
    code on meta inputs: its JVP or its no-grad forwards); None where it makes none here (rectified flow, or a
    teacher's solve, whose network the planner does not count)."""
    flow = recipe.flow
    objective = get_objective(flow.objective)
    if not objective.interval or flow.teacher_steps:
        return None

    def frozen_forward(x, t, cond, r=None):  # the engine's model without gradients, fused attention as it runs
        with torch.no_grad(), FusedAttention():
            return model(x.to(dtype), t, cond.to(dtype=dtype), r=r).float()

    models = ObjectiveModels(student=frozen_forward, frozen=frozen_forward, tangent=functools.partial(fp32_call, model))
    backend = flow.meanflow.backend(recipe.distributed.zero_stage)

    def rows(n: int) -> int:
        with torch.device("meta"):
            x, v = torch.zeros(n, *latent), torch.zeros(n, *latent)
            t, r = torch.full((n,), 0.75), torch.full((n,), 0.25)
            cond = _conditioning(recipe, shapes, n)
        return live_peak(lambda: objective.target(models, cond, x, t, r, v, flow=flow, jvp_backend=backend))

    return rows(1), rows(2)


def model_cost(recipe: Recipe) -> tuple[ModelCost, SampleShape, Recipe]:
    """Count the recipe's model: returns its cost, its sequence and the recipe with the model's input sizes filled
    in from the encoders (as the trainer fills them)."""
    text = recipe.text
    parts, shapes = [], {}
    for name, cfg in text.encoders.items():
        part, shapes[name] = frozen.text_encoder(name, cfg, f"text_encoders.encoders.{name}.name_or_path")
        parts.append(part)
    ae = frozen.autoencoder(recipe.autoencoder)
    if ae.part is not None:
        parts.append(ae.part)
    side = recipe.data.resolution // ae.downsample
    channels = ae.channels or recipe.data.channels
    with torch.device("meta"):
        probe = _conditioning(recipe, shapes, 1)
    sizes = {"in_channels": channels, "context_dim": probe.hidden.shape[2], "pooled_dim": probe.pooled.shape[1]}
    model_cfg = dataclasses.replace(recipe.model, **{k: v for k, v in sizes.items()
                                                     if getattr(recipe.model, k) is None})
    recipe = dataclasses.replace(recipe, model=model_cfg)
    family = family_of(model_cfg)
    dtype = DTYPES[recipe.distributed.precision]
    with torch.device("meta"):
        model = build_backbone(model_cfg).to(dtype)
        if model_cfg.lora is not None:
            apply_lora(model, model_cfg.lora)
            model.to(dtype)
    blocks = list(model.blocks()) if family.capabilities.block_transforms else []
    # Paired data gives each sample the references its family takes, resized to the target's size by the loader.
    references = family.capabilities.references if recipe.data.paired else 0

    def trace(batch: int):
        with torch.device("meta"):
            x = torch.zeros(batch, channels, side, side, dtype=dtype)
            t = torch.full((batch,), 0.5)
            cond = _conditioning(recipe, shapes, batch).to(dtype=dtype)
            if references:
                cond = cond.with_reference([torch.zeros_like(x) for _ in range(references)])
            target = torch.zeros(batch, channels, side, side)
        return trace_activations(model, blocks, (x, t, cond), lambda v: (v.float() - target).square().mean())

    trained = [p.shape for p in model.parameters() if p.requires_grad]
    objective = get_objective(recipe.flow.objective)
    targets = _target_cost(recipe, model, shapes, (channels, side, side), dtype)
    extra = {} if targets is None else dict(
        targets=targets, interval_rows=functools.partial(objective.interval_rows, flow=recipe.flow),
        targets_note=f"{objective.describe(recipe.flow.meanflow.backend(recipe.distributed.zero_stage))} targets")
    dropout = [recipe.flow.caption_dropout if c.caption_dropout is None else c.caption_dropout
               for c in text.encoders.values()]
    if any(p > 0 for p in dropout):
        extra["conditioning"] = tuple(_conditioning_bytes(recipe, shapes, b) for b in (1, 2))
    cost = ModelCost(params=count_params(model, blocks), quantisable=_quantisable(model), act1=trace(1),
                     act2=trace(2), encoders=parts,
                     block_frozen=tuple(sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in blocks),
                     block_quantisable=tuple(_quantisable(b) for b in blocks),
                     optimizer_state={name: optimizer_state_bytes(name, trained) for name in OPTIMIZER_NAMES},
                     **extra)
    patch = getattr(model_cfg, "patch_size", 1) or 1
    seq = SampleShape(image_tokens=(side // patch) ** 2, text_tokens=int(probe.hidden.shape[1]),
                   latent=(channels, side, side), references=references)
    return cost, seq, recipe
