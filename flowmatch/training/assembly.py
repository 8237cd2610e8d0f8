"""Assembling a training run from a recipe: the engine, the frozen encoders, the model, the loader, the time
schedule and the noise generators, each built from its own recipe section.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flowmatch.config import Recipe, to_yaml
from flowmatch.data import Loader, build_loader, ensure_shards, has_val_split
from flowmatch.encoders.conditioning import Conditioning
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.engine import Engine
from flowmatch.errors import RecipeError
from flowmatch.flow import TimeSchedule
from flowmatch.models.backbone import build_backbone
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_plan(batch_size: int, micro_batch_size: Optional[int], world_size: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for a global batch; errors name the numbers that clash."""
    micro = micro_batch_size or batch_size // world_size
    if micro < 1 or batch_size % (micro * world_size):
        raise RecipeError(
            f"train.batch_size={batch_size} is not a multiple of micro_batch_size ({micro}) x processes "
            f"({world_size}); choose a global batch divisible by both"
        )
    return micro, batch_size // (micro * world_size)


class EngineVelocity:
    """The engine's model as a velocity callable ``(x, t, cond) -> v``, float32 out.

    Floating inputs are cast to the engine's working dtype (DeepSpeed does not autocast); ``t`` stays float32,
    since the model embeds ``1000 t`` and bf16 would round ``t`` itself by up to ~0.004.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last_dtype: Optional[torch.dtype] = None
        """Dtype of the model's raw output in the latest call: the precision the run really computes in."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dt = self.engine.dtype
        out = self.engine.forward(x.to(dt), t.float(), cond.to(dtype=dt))
        self.last_dtype = out.dtype
        return out.float()


@dataclass
class TrainingRun:
    """Everything a run is made of, built once by :func:`assemble`."""

    recipe: Recipe
    """The resolved recipe (model input sizes filled in from the encoders)."""
    run_dir: Path
    engine: Engine
    encoders: FrozenEncoders
    velocity: EngineVelocity
    loader: Loader
    schedule: TimeSchedule
    micro_batch: int
    """Samples per process per forward."""
    accum: int
    """Micro batches per optimizer step."""
    generators: list[torch.Generator]
    """One noise generator per micro-batch slot this rank fills (slot = rank * accum + micro index), so the noise
    of a sample depends on its place in the global batch, not on how many processes share the batch."""
    null: Conditioning
    """The empty caption's conditioning (caption dropout's replacement)."""
    has_val: bool
    """Whether the data has a held-out split (the same answer on every rank: validation stays collective)."""

    @property
    def recipe_yaml(self) -> str:
        return to_yaml(self.recipe)


def build_model(run_recipe: Recipe, engine: Engine) -> torch.nn.Module:
    """The model (MMDiT, or the U-Net for model.kind: unet) with the same initial weights on every rank and stage,
    with activation checkpointing and compile applied from outside the model as the recipe asks."""
    seed = run_recipe.train.seed
    torch.manual_seed(seed)  # identical initial weights on every rank
    with engine.model_init():
        model = build_backbone(run_recipe.model)
    # The constructor initialised the weights already, except under ZeRO-3: reseed so that every stage starts from
    # the same weights.
    torch.manual_seed(seed)
    with engine.gathered_params(model, modify=True):  # under ZeRO-3 the parameters are partitioned by now
        model.init_weights()
    if run_recipe.model.kind != "mmdit" and (run_recipe.train.activation_checkpointing or run_recipe.train.compile):
        raise RecipeError(f"train.activation_checkpointing and train.compile apply to model.kind: mmdit only; set "
                          f"them to false for model.kind: {run_recipe.model.kind}")
    if run_recipe.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if run_recipe.train.compile:
        apply_compile(model)
    return model


def assemble(recipe: Recipe) -> TrainingRun:
    """Build a run: shards (rank 0, when the recipe names a builder), engine, encoders, model, loader, schedule."""
    engine = Engine(recipe.distributed)
    run_dir = Path(recipe.run_dir)
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_shards(recipe.data)
    engine.barrier()
    t = recipe.train
    seed_everything(t.seed + engine.rank)
    encoders = FrozenEncoders(recipe.text_encoder, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=engine.device)
    recipe = dataclasses.replace(recipe, model=encoders.fill_model_config(recipe.model))
    micro, accum = batch_plan(t.batch_size, t.micro_batch_size, engine.world_size)
    model = build_model(recipe, engine)
    seed_everything(t.seed + engine.rank)  # back to per-rank streams (data workers, posterior samples)
    engine.setup(model, [p for p in model.parameters() if p.requires_grad], recipe.optim, max_steps=t.max_steps,
                 micro_batch_size=micro, grad_accum_steps=accum)
    if t.ema_decay > 0:
        engine.ema_init(t.ema_decay, warmup=t.ema_warmup, profiles=t.ema_profiles)
    loader = build_loader(recipe.data, rank=engine.rank, world_size=engine.world_size, batch_size=micro,
                          seed=t.seed, encoders=encoders.fingerprints())
    first_slot = engine.rank * accum
    generators = [torch.Generator().manual_seed(t.seed * 1000 + first_slot + m) for m in range(accum)]
    return TrainingRun(recipe=recipe, run_dir=run_dir, engine=engine, encoders=encoders,
                       velocity=EngineVelocity(engine), loader=loader, schedule=TimeSchedule(recipe.flow),
                       micro_batch=micro, accum=accum, generators=generators, null=encoders.null(),
                       has_val=has_val_split(recipe.data))
