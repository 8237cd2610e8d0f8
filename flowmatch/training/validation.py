"""Validation during training: a sample grid of the recipe's prompts and the held-out loss at fixed timesteps.

The grid comes from the same :class:`~flowmatch.sampling.Pipeline` as `flowmatch sample`, run on the engine's
model (with the EMA weights swapped in when the run keeps an EMA).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch

from flowmatch.data import build_loader
from flowmatch.flow import flow_matching_loss, sample_path
from flowmatch.images import image_grid, save_png
from flowmatch.sampling import Pipeline

if TYPE_CHECKING:
    from flowmatch.monitor import Monitor
    from flowmatch.training.assembly import TrainingRun

# Timesteps at which validation loss is measured on held-out data with fixed noise: the SD3 paper (section 5.1)
# tracks validation loss averaged over fixed timesteps because it follows human preference closely.
VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
VALIDATION_NOISE_SEED = 1234
GRID_SCALE = 4  # nearest-neighbour upscaling of saved grids, so small images are visible


class Validator:
    """Runs validation for an assembled run; collective (every rank calls :meth:`validate`)."""

    def __init__(self, run: "TrainingRun") -> None:
        self.run = run
        self.monitor: Optional["Monitor"] = None

    @torch.no_grad()
    def validate(self, step: int) -> None:
        """Sample grid of the validation prompts (EMA weights when on) and held-out loss at fixed timesteps."""
        run = self.run
        e = run.engine
        e.eval()
        try:
            with e.ema_weights() if e.ema_enabled else contextlib.nullcontext():
                self.sample_grid(step)
                val = self.loss()
            if val is not None and self.monitor is not None:
                self.monitor.scalars(step, {"val_loss": val})
        finally:
            e.train()

    def sample_grid(self, step: int) -> None:
        run = self.run
        s = run.recipe.sampling
        pipe = Pipeline(run.velocity, run.encoders, run.recipe, device=run.engine.device)
        images = pipe.generate([p for p in s.prompts for _ in range(s.per_prompt)], seed=s.seed)
        if run.engine.is_main:
            grid = image_grid(images, rows=len(s.prompts))
            save_png(grid, run.run_dir / "samples" / f"step{step:07d}.png", scale=GRID_SCALE)
            if self.monitor is not None:
                self.monitor.image(step, "samples", grid)

    def loss(self) -> Optional[float]:
        """Mean held-out loss over VALIDATION_TIMESTEPS with fixed noise; None without a held-out split."""
        run = self.run
        e = run.engine
        if not run.has_val:
            return None
        loader = build_loader(run.recipe.data, rank=e.rank, world_size=e.world_size, batch_size=run.micro_batch,
                              seed=0, split="val", max_batches=1, encoders=run.encoders.fingerprints())
        x0, cond = run.encoders.encode_batch(next(iter(loader)))
        gen = torch.Generator().manual_seed(VALIDATION_NOISE_SEED + e.rank)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        total = torch.zeros((), device=e.device)
        for value in VALIDATION_TIMESTEPS:
            t = torch.full((x0.shape[0],), value, device=x0.device)
            path = sample_path(x0, noise, t)
            # Unweighted, so that it is comparable across recipes.
            total += flow_matching_loss(run.velocity(path.x_t, path.t, cond), path.target, path.t).loss
        return e.all_reduce_mean(total / len(VALIDATION_TIMESTEPS)).item()
