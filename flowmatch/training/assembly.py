"""Assembling a training run from a recipe: the engine, the frozen encoders, the model, the loader, the time
schedule and the noise generators, each built from its own recipe section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from flowmatch import init_from
from flowmatch.conditioning import Conditioning
from flowmatch.config import Recipe, to_yaml
from flowmatch.data import Loader, build_loader, ensure_shards, has_val_split, read_cache_info
from flowmatch.data.masks import describe_masks
from flowmatch.encoders.autoencoder import ensure_autoencoder
from flowmatch.encoders.cache import ensure_cache
from flowmatch.encoders.frozen import FrozenEncoders
from flowmatch.engine import Engine
from flowmatch.engine.launch import detect_launch
from flowmatch.errors import RecipeError
from flowmatch.families import build_backbone, family_of
from flowmatch.families.lora import apply_lora, load_lora_file
from flowmatch.flow import TimeSchedule
from flowmatch.init_from import InitRecord
from flowmatch.models.offload import BlockSwap, apply_block_swap, held_on_host
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile, set_attention
from flowmatch.plan.budget import apply_budget
from flowmatch.quantize import quantize_frozen
from flowmatch.run import record_paths, source_architecture
from flowmatch.runlock import RunLock
from flowmatch.training.fewstep import check_recipe, load_teacher


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

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The velocity at (x, t); with ``r`` (B,) the average velocity over [r, t] (float32 like t)."""
        dt = self.engine.dtype
        extra = {} if r is None else {"r": r.float()}
        out = self.engine.forward(x.to(dt), t.float(), cond.to(dtype=dt), **extra)
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
    """Caption dropout's replacement: per encoder, its encoded empty caption (or zeros, as it says)."""
    has_val: bool
    """Whether the data has a held-out split (the same answer on every rank: validation stays collective)."""
    init: Optional[InitRecord] = None
    """Where the starting weights came from (model.init_from), recorded in every checkpoint; None = random init."""
    teacher: Optional[Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]] = None
    """The frozen teacher of distillation (``flow.teacher``), ``teacher(x, t, cond) -> v``; None = from data."""
    paths: Optional[dict[str, str]] = None
    """Recipe key -> absolute path of each relative local path of the recipe (:func:`flowmatch.run.record_paths`),
    recorded in every checkpoint so the run opens from any working directory."""
    lock: Optional[RunLock] = None
    """run_dir's lock, held by rank 0 until the run ends (flowmatch.runlock)."""

    @property
    def recipe_yaml(self) -> str:
        return to_yaml(self.recipe)

    def __enter__(self) -> "TrainingRun":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut the engine down (every rank exits 0 after a good run), then release run_dir's lock, also when the
        engine's shutdown raises."""
        try:
            self.engine.__exit__(*exc)
        finally:
            if self.lock is not None:
                self.lock.release()


def build_model(run_recipe: Recipe, engine: Engine, init: Optional[InitRecord] = None) -> torch.nn.Module:
    """The model (its family's backbone: an MMDiT, or the U-Net) with the same initial weights on every rank and stage
    (the `init` weights, else a seeded random init), its LoRA adapters when the recipe has them, and activation
    checkpointing and compile applied from outside the model as the recipe asks. init_from and LoRA are MMDiT-only
    (ModelConfig rejects them for the families without those capabilities)."""
    seed = run_recipe.train.seed
    arch = run_recipe.model.architecture()
    torch.manual_seed(seed)  # identical initial weights on every rank
    if init is not None:
        # Below ZeRO-3 built on the meta device and given the loaded tensors: no random init of a model that size.
        with engine.model_init():
            model = build_backbone(run_recipe.model, device=None if engine.cfg.zero_stage == 3 else "meta")
        # Under ZeRO-3 rank 0's tensors are written into every rank's partitions: the others read nothing.
        reads = engine.is_main or engine.cfg.zero_stage != 3
        state = init_from.cast(init_from.load_weights(init), engine.dtype) if reads else None
        if state is not None:  # inputs the recipe adds (few-step training from a flow model) start at zero
            state = init_from.with_new_embedders(state, arch, seed)
        engine.assign_weights(model, state)
    else:
        with engine.model_init():
            model = build_backbone(run_recipe.model)
        # The constructor initialised the weights already, except under ZeRO-3: reseed so that every stage starts
        # from the same weights.
        torch.manual_seed(seed)
        with engine.gathered_params(model, modify=True):  # under ZeRO-3 the parameters are partitioned by now
            model.init_weights()
    if run_recipe.model.lora is not None:
        # Outside model_init: peft initialises the adapters after building them, which zero.Init's partitioned
        # parameters would ignore; DeepSpeed partitions them when it wraps the model. Seeded: the same on every rank.
        torch.manual_seed(seed)
        # DoRA's magnitude starts at the base rows' norms: under ZeRO-3 the base is partitioned, gather it to read.
        with engine.gathered_params(model) if run_recipe.model.lora.reads_base else contextlib.nullcontext():
            apply_lora(model, run_recipe.model.lora)
        if run_recipe.model.lora.init_from:  # the same file on every rank; a resumed run's checkpoint overrides it
            load_lora_file(model, run_recipe.model.lora, run_recipe.model.lora.init_from)
        if run_recipe.model.quantize is not None:
            if engine.cfg.zero_stage == 3:
                raise RecipeError(f"model.quantize: {run_recipe.model.quantize} with distributed.zero_stage: 3: the "
                                  "frozen base is partitioned there and cannot be quantised whole; use zero_stage 0-2")
            quantize_frozen(model, run_recipe.model.quantize)
    family = family_of(run_recipe.model)
    if not family.capabilities.block_transforms and (run_recipe.train.activation_checkpointing
                                                     or run_recipe.train.compile):
        raise RecipeError(f"train.activation_checkpointing and train.compile apply to model.kind: mmdit only; set "
                          f"them to false for model.kind: {run_recipe.model.kind} (model.family {family.name})")
    attention = run_recipe.train.attention
    if attention == "flex" and not family.capabilities.block_transforms:
        raise RecipeError(f"train.attention: flex applies to model.kind: mmdit only; use auto or sdpa for model.kind: "
                          f"{run_recipe.model.kind} (model.family {family.name})")
    if attention == "flex" and engine.device.type == "cpu":
        raise RecipeError("train.attention: flex needs CUDA to train (torch has no FlexAttention backward pass on "
                          "CPU); use train.attention: auto (SDPA with a mask on CPU, flex on CUDA with train.compile)")
    if family.capabilities.block_transforms:
        set_attention(model, attention)
    if run_recipe.train.block_swap:  # before checkpointing: its recomputation must run the swapping forward
        swap_blocks(run_recipe, engine, model)
    if run_recipe.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if run_recipe.train.compile:
        apply_compile(model)
    return model


def assemble(recipe: Recipe) -> TrainingRun:
    """Build a run: shards, autoencoder and feature cache (rank 0, each when the recipe names a builder and it is
    missing), engine, encoders, model (from model.init_from's weights when set), loader, schedule. Training on
    cached features frees the text encoders and the autoencoder's encoder half once the empty caption and the
    sampling prompts are encoded."""
    located = None
    lora = recipe.model.lora
    if lora is not None and lora.init_from and not Path(lora.init_from).is_file():  # before the base loads
        raise FileNotFoundError(f"model.lora.init_from={lora.init_from!r} is not a file: give the path of a LoRA "
                                ".safetensors file (diffusers', ComfyUI's or kohya's keys)")
    if recipe.model.init_from:  # the architecture comes from the weights: checked before anything starts
        located = init_from.locate(recipe.model.init_from)
        recipe = dataclasses.replace(recipe, model=init_from.with_architecture(
            recipe.model, source_architecture(*located)))
    budgeted = None
    if recipe.distributed.memory_budget_gb is not None:
        budgeted = apply_budget(recipe, detect_launch(os.environ).world_size, cuda=torch.cuda.is_available())
        recipe = budgeted.recipe
    engine = Engine(recipe.distributed)
    if budgeted is not None and engine.is_main:
        print(budgeted.message, flush=True)
    # Rank 0 hashes the weights (for a large model that takes a while) and every rank takes its record.
    init = None if located is None else engine.broadcast_object(
        describe_init(recipe.model.init_from, *located) if engine.is_main else None)
    run_dir = Path(recipe.run_dir)
    lock = RunLock(run_dir, "flowmatch train")
    if engine.is_main:  # one writer per run: rank 0 holds the lock, the others wait for it at the barrier below
        lock.acquire()
    try:
        return build_run(recipe, engine, init, run_dir, lock)
    except BaseException:
        lock.release()
        raise


def build_run(recipe: Recipe, engine: Engine, init: Optional[InitRecord], run_dir: Path, lock: RunLock) -> TrainingRun:
    """The rest of :func:`assemble`, once rank 0 holds run_dir's lock."""
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_shards(recipe.data)
        ensure_autoencoder(recipe.autoencoder, recipe.data)
    engine.barrier()
    t = recipe.train
    seed_everything(t.seed + engine.rank)
    encoders = FrozenEncoders(recipe.text, recipe.autoencoder, image_channels=recipe.data.channels,
                              device=engine.device)
    # Every rank encodes its share of a missing cache with its own encoders.
    ensure_cache(recipe.data, encoders, rank=engine.rank, world_size=engine.world_size,
                 progress=recipe.logging.progress and engine.is_main)
    engine.barrier()
    recipe = dataclasses.replace(recipe, model=encoders.fill_model_config(recipe.model))
    check_recipe(recipe)
    micro, accum = batch_plan(t.batch_size, t.micro_batch_size, engine.world_size)
    model = build_model(recipe, engine, init)
    seed_everything(t.seed + engine.rank)  # back to per-rank streams (data workers, posterior samples)
    # The engine moves (and casts) the whole model to the device: the swapped blocks' weights stay on the host.
    with held_on_host(model.blocks() if t.block_swap else []):
        engine.setup(model, [p for p in model.parameters() if p.requires_grad], recipe.optim,
                     max_steps=t.max_steps, micro_batch_size=micro, grad_accum_steps=accum)
    if t.ema_decay > 0:
        engine.init_ema(t.ema_decay, warmup=t.ema_warmup, profiles=t.ema_profiles)
    loader = build_loader(recipe.data, rank=engine.rank, world_size=engine.world_size, batch_size=micro,
                          seed=t.seed, encoders=encoders.fingerprints())
    if engine.is_main:
        print(describe_masks(recipe.data.masks, recipe.data.alpha_masks), flush=True)
    has_val = has_val_split(recipe.data)
    if loader.cached and (not has_val or read_cache_info(recipe.data, "val") is not None):
        encoders.release(keep=recipe.sampling.prompts)  # the features hold every caption's encoding
    first_slot = engine.rank * accum
    generators = [torch.Generator().manual_seed(t.seed * 1000 + first_slot + m) for m in range(accum)]
    return TrainingRun(recipe=recipe, run_dir=run_dir, engine=engine, encoders=encoders,
                       velocity=EngineVelocity(engine), loader=loader, schedule=TimeSchedule(recipe.flow),
                       micro_batch=micro, accum=accum, generators=generators, null=encoders.dropout_null(),
                       has_val=has_val, init=init, teacher=load_teacher(recipe, engine.device), lock=lock,
                       paths=record_paths(recipe))


def swap_blocks(recipe: Recipe, engine: Engine, model: torch.nn.Module) -> BlockSwap:
    """train.block_swap: the last blocks' frozen weights in CPU memory, streamed to the device per use; the engine
    moves the rest of the model to the device (:func:`held_on_host` in :func:`build_run`)."""
    t, family = recipe.train, family_of(recipe.model)
    if recipe.model.lora is None or engine.cfg.zero_stage == 3 or not family.capabilities.block_transforms:
        raise RecipeError(f"train.block_swap: {t.block_swap} streams the frozen base weights of a LoRA run "
                          f"(model.lora) without ZeRO-3 on a block-structured model; this run has model.lora "
                          f"{'set' if recipe.model.lora else 'unset'}, zero_stage {engine.cfg.zero_stage}, "
                          f"model.family {family.name}: set train.block_swap: 0")
    blocks = model.blocks()
    if t.block_swap > len(blocks):
        raise RecipeError(f"train.block_swap: {t.block_swap} is more than the model's {len(blocks)} blocks")
    return apply_block_swap(blocks, t.block_swap, engine.device)


def describe_init(source: str, kind: str, path: Path) -> InitRecord:
    """The hashed record of a recipe's init_from, said on the console."""
    rec = init_from.record(source, kind, path)
    print(f"init_from: {kind} weights {path} (SHA-256 {rec.sha256[:16]}...)", flush=True)
    return rec
