"""The training loop: batches -> rectified-flow loss -> engine step, with EMA, checkpoints, validation and logs.

It calls the flow layer for the math, the engine for everything distributed and checkpoint.py for files;
it never re-derives any of them.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flowmatch.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowmatch.config import Recipe, RecipeError, to_yaml
from flowmatch.data import Batch, build_loader, ensure_shards, has_val_split, merge_loader_states
from flowmatch.encoders.conditioning import Conditioning
from flowmatch.encoders.text import TextEmbeddings
from flowmatch.engine import Engine
from flowmatch.flow import TimeSchedule, drop_captions, flow_matching_loss, sample_path
from flowmatch.models.flops import training_flops_per_step
from flowmatch.models.mmdit import MMDiT
from flowmatch.models.parallelize import apply_activation_checkpointing, apply_compile
from flowmatch.monitor import Monitor
from flowmatch.pipeline import (
    Pipeline,
    build_encoders,
    encode_batch,
    encoder_fingerprints,
    image_grid,
    resolve_model_config,
    save_png,
)

# Timesteps at which validation loss is measured on held-out data with fixed noise: the SD3 paper (section 5.1)
# tracks validation loss averaged over fixed timesteps because it follows human preference closely.
VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Loss is also logged per timestep bucket (quarters of [0, 1]) to see which noise levels train slowly.
LOSS_BUCKETS = 4


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says what happened and what to do."""


@dataclass
class TrainSummary:
    """What a finished `train` call did."""

    run_dir: Path
    start_step: int
    final_step: int
    final_loss: float
    skipped_steps: int
    seconds: float
    last_checkpoint: Optional[Path]


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


class Trainer:
    """Holds everything a run needs; `fit()` trains to train.max_steps, resuming from the newest checkpoint."""

    def __init__(self, recipe: Recipe) -> None:
        self.engine = Engine(recipe.distributed)
        self.run_dir = Path(recipe.run_dir)
        e = self.engine
        if e.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ensure_shards(recipe.data)
        e.barrier()
        seed_everything(recipe.train.seed + e.rank)
        self.text_encoder, self.autoencoder = build_encoders(recipe, e.device)
        self.recipe = recipe = resolve_model_config(recipe, self.text_encoder, self.autoencoder)
        self.recipe_yaml = to_yaml(recipe)

        torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
        with e.model_init():
            model = MMDiT(recipe.model)
        # The constructor initialised the weights already, except under ZeRO-3: reseed so that every stage starts
        # from the same weights.
        torch.manual_seed(recipe.train.seed)
        with e.gathered_params(model, modify=True):  # under ZeRO-3 the parameters are partitioned by now
            model.init_weights()
        seed_everything(recipe.train.seed + e.rank)  # back to per-rank streams (data workers, posterior samples)
        if recipe.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if recipe.train.compile:
            apply_compile(model)
        self.micro_batch, self.accum = batch_plan(recipe.train.batch_size, recipe.train.micro_batch_size, e.world_size)
        o = recipe.optim
        e.setup(
            model,
            [p for p in model.parameters() if p.requires_grad],
            lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, warmup_steps=o.warmup_steps,
            max_steps=recipe.train.max_steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
            micro_batch_size=self.micro_batch, grad_accum_steps=self.accum, grad_clip=o.grad_clip,
        )
        if recipe.train.ema_decay > 0:
            e.ema_init(recipe.train.ema_decay)
        self.encoders = encoder_fingerprints(self.text_encoder, self.autoencoder)
        self.loader = build_loader(recipe.data, rank=e.rank, world_size=e.world_size, batch_size=self.micro_batch,
                                   seed=recipe.train.seed, encoders=self.encoders)
        self.has_val = has_val_split(recipe.data)  # the same answer on every rank: validation stays collective
        self.schedule = TimeSchedule(recipe.flow)
        self.null_text = self.text_encoder.encode([""])
        # One noise generator per micro-batch slot of the global batch (slot = rank * accum + micro index), so the
        # noise of a sample depends on its place in the global batch, not on how many processes share the batch.
        first_slot = e.rank * self.accum
        self.generators = [torch.Generator().manual_seed(recipe.train.seed * 1000 + first_slot + m)
                           for m in range(self.accum)]
        self.generator = self.generators[0]  # the current slot's, read by micro_loss
        self.step = 0
        self.skipped = 0  # micro batches dropped for a non-finite loss
        self.monitor: Optional[Monitor] = None

    # ------------------------------------------------------------------------------------------ one step

    def encode_batch(self, batch: Batch) -> tuple[torch.Tensor, TextEmbeddings]:
        """Latents (B, C, h, w) and text embeddings for a batch, from cached features when the shards carry them."""
        return encode_batch(batch, self.text_encoder, self.autoencoder, self.engine.device)

    def micro_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward one micro batch: (loss, per-sample loss (B,), t (B,))."""
        x0, text = self.encode_batch(batch)
        text = drop_captions(text, self.null_text, self.recipe.flow.caption_dropout, generator=self.generator)
        b, _, h, w = x0.shape
        p = self.recipe.model.patch_size
        # Noise and timesteps come from a CPU generator: the same seed gives the same run on any device.
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        t = self.schedule.sample(b, seq_len=(h // p) * (w // p), generator=self.generator).to(x0.device)
        path = sample_path(x0, noise, t)
        pred = self.forward(path.x_t, path.t, text)
        out = self.schedule.loss(pred.float(), path.target, path.t)
        return out.loss, out.per_sample.detach(), t

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """The engine's model on a batch's text embeddings, through `velocity`."""
        return self.velocity(x, t, Conditioning(text.hidden, text.mask, text.pooled))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The engine's model on float inputs cast to its dtype (DeepSpeed does not autocast); float32 out.
        Also the Pipeline velocity callable."""
        dt = self.engine.dtype
        # t stays float32: the model embeds t * 1000 in float32, and bf16 would round t itself by up to ~0.004.
        return self.engine.forward(x.to(dt), t.float(), cond.to(dtype=dt)).float()

    def next_batch(self) -> Batch:
        return next(self.batches)

    # ------------------------------------------------------------------------------------------ the loop

    def resume(self) -> None:
        """Load the newest complete checkpoint of run_dir, if any, and say so."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        state = load_checkpoint(self.engine, ckpt)
        self.step = int(state["step"])
        # Not strict: with another number of ranks the loader warns and starts the next epoch.
        self.loader.load_state_dict(state["loader"], strict=False)
        generators = state["generator"]  # one state per micro-batch slot of the global batch
        if len(generators) == self.engine.world_size * self.accum:  # else: another layout, keep the fresh seeds
            first_slot = self.engine.rank * self.accum
            for m, g in enumerate(self.generators):
                g.set_state(generators[first_slot + m])
        if self.engine.is_main:
            print(f"resuming from {ckpt} (step {self.step})", flush=True)

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current step (atomically; keeps the newest train.keep_checkpoints)."""
        e = self.engine
        loaders = merge_loader_states(e.all_gather_object(self.loader.state_dict()))
        slots = [s for states in e.all_gather_object([g.get_state() for g in self.generators]) for s in states]
        state = {"step": self.step, "loader": loaders, "generator": slots}
        return save_checkpoint(
            self.engine, self.run_dir, self.step, client_state=state, recipe_yaml=self.recipe_yaml,
            keep=self.recipe.train.keep_checkpoints, ema=self.recipe.train.ema_decay > 0,
        )

    def fit(self) -> TrainSummary:
        """Train until train.max_steps; returns a summary. Raises TrainingError when the loss stays non-finite."""
        r, e = self.recipe, self.engine
        self.resume()
        start_step, started = self.step, time.time()
        if e.is_main:
            (self.run_dir / "recipe.yaml").write_text(self.recipe_yaml)
        self.monitor = Monitor(self.run_dir, enabled=e.is_main, total_steps=r.train.max_steps, start_step=start_step,
                               progress=r.logging.progress, tensorboard=r.logging.tensorboard)
        self.batches = iter(self.loader)
        flops_per_step = self.flops_per_step()
        e.train()
        try:
            return self._loop(start_step, started, flops_per_step)
        finally:
            self.batches.close()  # stops the loader's worker processes
            self.monitor.close()

    def _loop(self, start_step: int, started: float, flops_per_step: float) -> TrainSummary:
        r, e, mon = self.recipe, self.engine, self.monitor
        window = torch.zeros(2 + 2 * LOSS_BUCKETS, device=e.device)  # loss sum, count, bucket sums, bucket counts
        window_start, window_steps = time.time(), 0
        bad_in_a_row = 0
        last_loss, last_ckpt = float("nan"), None
        while self.step < r.train.max_steps:
            for m in range(self.accum):
                self.generator = self.generators[m]
                while True:
                    loss, per_sample, t = self.micro_loss(self.next_batch())
                    # Every rank must agree before backward, or one rank's inf reaches the others' gradients.
                    if e.all_finite(loss):
                        bad_in_a_row = 0
                        break
                    self.skipped += 1
                    bad_in_a_row += 1
                    mon.message(f"step {self.step}: non-finite loss, micro batch skipped ({self.skipped} so far)")
                    if bad_in_a_row >= r.train.max_bad_steps:
                        raise TrainingError(
                            f"the loss was non-finite {bad_in_a_row} times in a row at step {self.step}; stopping. "
                            f"The last good checkpoint ({latest_checkpoint(self.run_dir)}) is intact: lower optim.lr, "
                            "check the data, or resume from it."
                        )
                e.backward(loss, check_finite=False)  # all_finite above already agreed
                bucket = (t * LOSS_BUCKETS).long().clamp(max=LOSS_BUCKETS - 1)
                window[0] += loss.detach()
                window[1] += 1
                window[2:2 + LOSS_BUCKETS].index_add_(0, bucket, per_sample)
                window[2 + LOSS_BUCKETS:].index_add_(0, bucket, torch.ones_like(per_sample))
            result = e.step()
            if r.train.ema_decay > 0:
                e.ema_update()
            self.step += 1
            window_steps += 1
            mon.advance()
            if self.step % r.train.log_every == 0 or self.step == r.train.max_steps:
                last_loss = self.log(window, window_steps, time.time() - window_start, result, flops_per_step)
                window.zero_()
                window_start, window_steps = time.time(), 0
            if r.train.validate_every and self.step % r.train.validate_every == 0:
                self.validate()
            if self.step % r.train.checkpoint_every == 0 or self.step == r.train.max_steps:
                last_ckpt = self.checkpoint()
        if r.train.validate_every == 0 or self.step % r.train.validate_every:
            self.validate()
        if last_ckpt is None:
            last_ckpt = latest_checkpoint(self.run_dir)
        return TrainSummary(self.run_dir, start_step, self.step, last_loss, self.skipped, time.time() - started,
                            last_ckpt)

    def flops_per_step(self) -> float:
        """Estimated training FLOPs of one optimizer step (global batch), for throughput and MFU logging.

        Sized on a meta-device copy: the engine's model may be sharded (ZeRO-3), which hides parameter sizes.
        """
        r = self.recipe
        height, width = r.data.size
        f = self.autoencoder.downsample
        prompts = self.text_encoder.encode(r.sampling.prompts[:16] or ["a photo"])
        text_len = max(1, round(prompts.mask.sum().item() / len(prompts)))  # validation prompts' mean length
        with torch.device("meta"):
            shape_model = MMDiT(r.model)
        return training_flops_per_step(shape_model, batch_size=r.train.batch_size, latent_size=(height // f, width // f),
                                       text_len=text_len).total

    def log(self, window: torch.Tensor, steps: int, seconds: float, result, flops_per_step: float) -> float:
        """Reduce the window's sums across ranks and record them (the loop's only host sync)."""
        e, r = self.engine, self.recipe
        bad = torch.tensor([float(self.loader.bad_samples)], device=e.device)
        sums = e.all_reduce_sum(torch.cat([window, bad])).cpu()
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        buckets = sums[2:2 + LOSS_BUCKETS] / sums[2 + LOSS_BUCKETS:2 + 2 * LOSS_BUCKETS].clamp(min=1)
        samples_per_s = steps * r.train.batch_size / max(seconds, 1e-9)
        tflops = steps * flops_per_step / max(seconds, 1e-9) / 1e12
        values = {"loss": loss, "lr": e.lr, "samples_per_s": samples_per_s, "tflops_per_s": tflops}
        postfix = {"loss": f"{loss:.4f}", "lr": f"{e.lr:.2e}", "samples/s": f"{samples_per_s:.0f}"}
        if r.logging.peak_tflops > 0:
            values["mfu"] = tflops / (r.logging.peak_tflops * e.world_size)
            postfix["mfu"] = f"{values['mfu']:.1%}"
        values["bad_samples"] = sums[-1].item()
        values["skipped_batches"] = float(self.skipped)
        if result is not None and result.grad_norm is not None:
            values["grad_norm"] = float(result.grad_norm)
        for i, (v, n) in enumerate(zip(buckets.tolist(), sums[2 + LOSS_BUCKETS:2 + 2 * LOSS_BUCKETS].tolist())):
            if n > 0:  # a bucket no sample fell in this window has no loss to report
                values[f"loss_t{i}"] = v
        self.monitor.scalars(self.step, values, postfix=postfix)
        return loss

    # ------------------------------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> None:
        """Sample grid of the validation prompts (EMA weights when on) and held-out loss at fixed timesteps."""
        e = self.engine
        e.eval()
        try:
            self._validate()
        finally:
            e.train()

    def _validate(self) -> None:
        e, r = self.engine, self.recipe
        with e.ema_weights() if r.train.ema_decay > 0 else contextlib.nullcontext():
            pipe = Pipeline(self.velocity, self.text_encoder, self.autoencoder, r, device=e.device)
            s = r.sampling
            prompts = [p for p in s.prompts for _ in range(s.per_prompt)]
            images = pipe.generate(prompts, seed=s.seed)
            if e.is_main:
                grid = image_grid(images, rows=len(s.prompts))
                save_png(grid, self.run_dir / "samples" / f"step{self.step:07d}.png", scale=4)
                self.monitor.image(self.step, "samples", grid)
            val = self.validation_loss()
        if val is not None:
            self.monitor.scalars(self.step, {"val_loss": val})

    def validation_loss(self) -> Optional[float]:
        """Mean held-out loss over VALIDATION_TIMESTEPS with fixed noise; None without a held-out split."""
        e = self.engine
        if not self.has_val:
            return None
        loader = build_loader(self.recipe.data, rank=e.rank, world_size=e.world_size, batch_size=self.micro_batch,
                              seed=0, split="val", max_batches=1, encoders=self.encoders)
        batch = next(iter(loader))
        x0, text = self.encode_batch(batch)
        gen = torch.Generator().manual_seed(1234 + e.rank)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        total = torch.zeros((), device=e.device)
        for value in VALIDATION_TIMESTEPS:
            t = torch.full((x0.shape[0],), value, device=x0.device)
            path = sample_path(x0, noise, t)
            pred = self.forward(path.x_t, path.t, text)
            total += flow_matching_loss(pred.float(), path.target, path.t).loss  # unweighted, comparable across recipes
        return e.all_reduce_mean(total / len(VALIDATION_TIMESTEPS)).item()


def train(recipe: Recipe) -> TrainSummary:
    """Train a recipe (resuming from run_dir's newest checkpoint) and return a summary."""
    trainer = Trainer(recipe)
    with trainer.engine:  # shuts the process group down cleanly, so every rank exits 0 after a good run
        return trainer.fit()
