"""Validation during training: the held-out loss at fixed timesteps, of the raw and of the EMA weights, and a
sample grid of the better ones.

The grid comes from the same :class:`~flowmatch.sampling.Pipeline` as `flowmatch sample`, run on the engine's
model. With paired (editing) data each row is one sampling prompt applied to a held-out sample's reference image:
the reference first, then the outputs. The loss (:func:`fixed_time_loss`) is also how `flowmatch ema --eval`
compares reconstructed EMAs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch

from flowmatch.data import build_loader, has_val_split
from flowmatch.data.pixels import model_to_unit
from flowmatch.data.shards import val_source_names
from flowmatch.flow import Formulation, flow_matching_loss, sample_path, with_guidance
from flowmatch.images import image_grid, save_png
from flowmatch.sampling import GenerationConfig, Pipeline

if TYPE_CHECKING:
    from flowmatch.conditioning import Conditioning
    from flowmatch.data.config import DataConfig
    from flowmatch.encoders.frozen import FrozenEncoders
    from flowmatch.monitor import Monitor
    from flowmatch.sampling.generate import VelocityModel
    from flowmatch.training.assembly import TrainingRun

# Timesteps at which validation loss is measured on held-out data with fixed noise: the SD3 paper (section 5.1)
# tracks validation loss averaged over fixed timesteps because it follows human preference closely.
VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
VALIDATION_NOISE_SEED = 1234
GRID_SCALE = 4  # nearest-neighbour upscaling of saved grids, so small images are visible


def heldout_batch(data: "DataConfig", encoders: "FrozenEncoders", batch_size: int, *, rank: int = 0,
                  world_size: int = 1, source: Optional[str] = None) -> tuple[torch.Tensor, "Conditioning"]:
    """The first held-out batch of this rank (of data source `source` only, when named): latents x0 (B, C, h, w)
    and their conditioning."""
    loader = build_loader(data, rank=rank, world_size=world_size, batch_size=batch_size, seed=0, split="val",
                          max_batches=1, encoders=encoders.fingerprints(), source=source)
    return encoders.encode_batch(next(iter(loader)))


@torch.no_grad()
def grid_references(data: "DataConfig", encoders: "FrozenEncoders", count: int) -> torch.Tensor:
    """The first reference image of the first ``count`` held-out samples (of the training split when there is no
    held-out one), cycled when there are fewer: (count, C, H, W) in [0, 1], for the rows of an editing grid."""
    split = "val" if has_val_split(data) else "train"
    loader = build_loader(data, rank=0, world_size=1, batch_size=count, seed=0, split=split, max_batches=1,
                          encoders=encoders.fingerprints())
    batch = next(iter(loader))
    first = batch.ref_images[:, 0] if batch.ref_images is not None else encoders.decode(
        batch.ref_latents[:, 0].to(encoders.device))
    return model_to_unit(first.cpu()).clamp(0, 1)[torch.arange(count) % len(batch)]


@torch.no_grad()
def fixed_time_loss(velocity: "VelocityModel", x0: torch.Tensor, cond: "Conditioning", *,
                    rank: int = 0, formulation: Optional[Formulation] = None) -> torch.Tensor:
    """() mean unweighted loss of ``velocity`` on x0 (B, C, h, w) over VALIDATION_TIMESTEPS, with noise fixed per
    rank: the one validation metric of every task, comparable across weights, runs and recipes (of one
    formulation: with ``formulation`` the model's prediction is compared with its own target)."""
    gen = torch.Generator().manual_seed(VALIDATION_NOISE_SEED + rank)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    total = torch.zeros((), device=x0.device)
    for value in VALIDATION_TIMESTEPS:
        t = torch.full((x0.shape[0],), value, device=x0.device)
        path = formulation.training_sample(x0, noise, t) if formulation else sample_path(x0, noise, t)
        total += flow_matching_loss(velocity(path.x_t, path.t, cond), path.target, path.t).loss
    return total / len(VALIDATION_TIMESTEPS)


class Validator:
    """Runs validation for an assembled run; collective (every rank calls :meth:`validate`).

    With an EMA and a held-out split, the raw and the EMA weights are both measured; :attr:`ema_better` records
    which has the lower validation loss, the checkpoint marks that one as the default weights of pipelines, and
    the sample grid shows it.
    """

    def __init__(self, run: "TrainingRun") -> None:
        self.run = run
        self.monitor: Optional["Monitor"] = None
        self.ema_better: Optional[bool] = None
        """Whether the latest validation found the EMA weights better (None: not measured)."""
        self.last_step: Optional[int] = None
        """The step of the latest validation."""

    def _weights(self, ema: bool) -> contextlib.AbstractContextManager[None]:
        """Context in which the model holds the EMA weights when ``ema`` and the run keeps an EMA."""
        engine_ema = self.run.engine.ema
        return engine_ema.weights() if ema and engine_ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def validate(self, step: int) -> None:
        """Held-out loss at fixed timesteps of the raw (and EMA) weights, and a sample grid of the better ones."""
        e = self.run.engine
        e.eval()
        try:
            raw, ema = self.loss(), None
            if e.ema is not None:
                with e.ema.weights():
                    ema = self.loss()
                self.ema_better = None if raw is None or ema is None else ema <= raw
            # The grid shows what pipelines will load: the EMA unless validation found the raw weights better.
            with self._weights(self.ema_better is not False):
                self.sample_grid(step)
            values = {} if raw is None else {"val_loss": raw}
            if ema is not None:
                values = {"val_loss": min(raw, ema), "val_loss_raw": raw, "val_loss_ema": ema,
                          "ema_default": float(ema <= raw)}
            with self._weights(bool(self.ema_better)):
                for name in val_source_names(self.run.recipe.data):  # a mixture: each source's own held-out loss
                    values[f"val_loss_{name}"] = self.loss(name)
            if values and self.monitor is not None:
                self.monitor.scalars(step, values)
            self.last_step = step
        finally:
            e.train()

    def sample_grid(self, step: int) -> None:
        run = self.run
        s = run.recipe.sampling
        pipe = Pipeline(run.velocity, run.encoders, GenerationConfig.of(run.recipe), device=run.engine.device)
        prompts = [p for p in s.prompts for _ in range(s.per_prompt)]
        if run.recipe.data.paired:  # each row: a held-out reference, then the prompt's edits of it
            refs = grid_references(run.recipe.data, run.encoders, len(s.prompts))
            images = pipe.generate(prompts, images=refs.repeat_interleave(s.per_prompt, 0), seed=s.seed)
            images = torch.cat([refs[:, None], images.cpu().reshape(len(refs), s.per_prompt, *images.shape[1:])], 1)
            images = images.flatten(0, 1)
        else:
            images = pipe.generate(prompts, seed=s.seed)
        if run.engine.is_main:
            grid = image_grid(images, rows=len(s.prompts))
            save_png(grid, run.run_dir / "samples" / f"step{step:07d}.png", scale=GRID_SCALE)
            if self.monitor is not None:
                self.monitor.image(step, "samples", grid)

    def loss(self, source: Optional[str] = None) -> Optional[float]:
        """Mean held-out loss over VALIDATION_TIMESTEPS with fixed noise, over all ranks (of data source `source`
        only, when named); None without a held-out split."""
        run = self.run
        e = run.engine
        if not run.has_val:
            return None
        x0, cond = heldout_batch(run.recipe.data, run.encoders, run.micro_batch, rank=e.rank,
                                 world_size=e.world_size, source=source)
        if run.recipe.model.guidance_embed:  # the unguided conditional velocity is the one noise - x0 estimates
            cond = with_guidance(cond, 1.0)
        return e.all_reduce_mean(fixed_time_loss(run.velocity, x0, cond, rank=e.rank,
                                                 formulation=Formulation(run.recipe.flow))).item()
