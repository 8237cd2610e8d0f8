"""The training loop: batches -> rectified-flow loss -> engine step, with EMA, checkpoints, validation and logs.

It calls the flow layer for the math (:func:`micro_loss`), the engine for everything distributed, including
what a non-finite loss does, and :mod:`flowmatch.checkpoint` for files; it never re-derives any of them. SIGTERM
or SIGUSR1 stops it cleanly after the current optimizer step, with a checkpoint (:mod:`.preemption`).
Between log intervals the loop reads nothing back from the device: logged sums stay on the device until the log
step reduces them (:mod:`.metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from flowmatch.checkpoint import latest_checkpoint
from flowmatch.conditioning import Conditioning
from flowmatch.config import Recipe
from flowmatch.encoders.combine import TextPart
from flowmatch.families.lora import training_flops
from flowmatch.flow import FlowConfig, ObjectiveLoss, ObjectiveModels, TimeSchedule, get_objective, objective_loss
from flowmatch.monitor import Monitor
from flowmatch.posthoc import write_snapshot
from flowmatch.training.assembly import TrainingRun, assemble
from flowmatch.training.checkpointing import Checkpointing, TrainingError
from flowmatch.training.fewstep import jvp_backend, objective_models
from flowmatch.training.metrics import Metrics
from flowmatch.training.preemption import Preemption
from flowmatch.training.validation import Validator


@dataclass
class TrainSummary:
    """What a finished `train` call did."""

    run_dir: Path
    start_step: int
    final_step: int
    final_loss: float
    skipped_steps: int
    """Optimizer steps the engine discarded for a non-finite loss, over the whole run (survives resume)."""
    seconds: float
    last_checkpoint: Optional[Path]
    compute_dtype: str
    """Dtype of the model's output during training, as observed (proves the recipe's precision took effect)."""
    preempted: bool = False
    """The run stopped before max_steps on a stop signal (SIGTERM, SIGUSR1, SIGINT), after writing a checkpoint."""
    stop_signal: Optional[str] = None
    """The stop signal this process received (``SIGINT`` for Ctrl-C: the command then exits 130), if any."""


def micro_loss(velocity: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Conditioning, null: Conditioning, *,
               schedule: TimeSchedule, flow: FlowConfig, patch_size: int, generator: torch.Generator,
               dropout_parts: Optional[Sequence[tuple[TextPart, float]]] = None,
               models: Optional[ObjectiveModels] = None, guided: bool = False,
               jvp_backend: str = "exact", mask: Optional[torch.Tensor] = None) -> ObjectiveLoss:
    """The loss of ``flow.objective`` on one micro batch x0 (B, C, h, w) with its conditioning (and the batch's
    per-sample masks (B, 1, H, W), None = all).

    Caption dropout, noise and times all draw from ``generator`` (a CPU generator: the same seed gives the same
    run on any device), in that order. For rectified flow the model sees ``x_t = (1 - t) x0 + t noise`` and
    regresses ``noise - x0`` with the schedule's loss weighting (other formulations, ``flow.path`` and
    ``flow.prediction``, take x_t and the target from :class:`~flowmatch.flow.Formulation`); the few-step
    objectives and guidance as an input need the further callables of ``models`` (whose ``student`` is
    ``velocity``): see :func:`flowmatch.flow.objective_loss`. ``dropout_parts`` drops each text encoder's share
    of ``cond`` independently (``FrozenEncoders.dropout_parts``); None drops whole rows with
    ``flow.caption_dropout``.
    """
    b, _, h, w = x0.shape
    return objective_loss(models or ObjectiveModels(student=velocity), x0, cond, null, schedule=schedule, flow=flow,
                          seq_len=(h // patch_size) * (w // patch_size), generator=generator, guided=guided,
                          jvp_backend=jvp_backend, dropout_parts=dropout_parts, mask=mask)


class Trainer:
    """Trains an assembled run to ``train.max_steps``, resuming from its newest checkpoint."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.recipe = run.recipe
        self.engine = run.engine
        self.step = 0
        self.monitor: Optional[Monitor] = None
        self.validator = Validator(run)
        self.checkpoints = Checkpointing(run, self.validator)
        """Resume, checkpoints and the stop checkpoint (:mod:`.checkpointing`)."""
        self.preemption = Preemption(run.engine.rank)
        self.metrics: Optional[Metrics] = None
        """Logged losses: summed on the device, reduced, recorded and judged at each log step (:mod:`.metrics`)."""
        self.jvp_backend = jvp_backend(run.recipe)
        self.objective = get_objective(run.recipe.flow.objective)
        exact = self.objective.uses_jvp and self.jvp_backend == "exact"
        self.models = objective_models(run.velocity, run.engine, exact_jvp=exact, teacher=run.teacher)

    # -- one micro batch -------------------------------------------------------------------------------------------

    def micro_loss(self, batch, generator: torch.Generator) -> ObjectiveLoss:
        """Encode a loader batch (or take its cached features) and compute its loss with ``generator``."""
        run = self.run
        x0, cond = run.encoders.encode_batch(batch)
        return micro_loss(run.velocity, x0, cond, run.null, schedule=run.schedule, flow=self.recipe.flow,
                          patch_size=self.recipe.model.patch_size, generator=generator,
                          dropout_parts=run.encoders.dropout_parts(self.recipe.flow.caption_dropout),
                          models=self.models, guided=self.recipe.model.guidance_embed, jvp_backend=self.jvp_backend,
                          mask=None if batch.masks is None else batch.masks.to(x0.device))

    # -- the loop ---------------------------------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        """Train until train.max_steps, or until a stop signal (then with a checkpoint of the step reached); returns
        a summary. Raises TrainingError when the loss stays non-finite."""
        with self.preemption:
            return self._fit()

    def _fit(self) -> TrainSummary:
        r, e, run = self.recipe, self.engine, self.run
        self.step = self.checkpoints.resume()
        start_step, started = self.step, time.time()
        if e.is_main:
            (run.run_dir / "recipe.yaml").write_text(run.recipe_yaml)
        self.monitor = Monitor(run.run_dir, r.logging, enabled=e.is_main, total_steps=r.train.max_steps,
                               start_step=start_step)
        self.validator.monitor = self.monitor
        if self.objective.interval or r.flow.teacher:
            self.monitor.message(self.objective.describe(self.jvp_backend)
                                 + (f", teacher {r.flow.teacher}" if r.flow.teacher else "")
                                 + (f" (flow map, {r.flow.teacher_steps} midpoint steps)"
                                    if r.flow.teacher_steps else ""))
        batches = iter(run.loader)
        e.train()
        try:
            last_loss, last_ckpt, preempted = self._loop(batches)
        finally:
            batches.close()  # stops the loader's worker processes
            self.monitor.close()
        return TrainSummary(run.run_dir, start_step, self.step, last_loss, e.skipped_steps, time.time() - started,
                            last_ckpt or latest_checkpoint(run.run_dir), str(run.velocity.last_dtype), preempted,
                            self.preemption.received)

    def _loop(self, batches) -> tuple[float, Optional[Path], bool]:
        """(last logged loss, last checkpoint written, whether a stop signal ended the loop early)."""
        r, e, run, mon = self.recipe, self.engine, self.run, self.monitor
        t = r.train
        self.metrics = Metrics(e, run.loader, t, r.logging.peak_tflops, mon, run.run_dir, self.flops_per_step())
        window = self.metrics.window
        bad_in_a_row = 0
        last_loss, last_ckpt = float("nan"), None
        while self.step < t.max_steps:
            if self.preemption.agreed(e):  # the same answer on every rank, once per optimizer step
                signal_name = self.preemption.received or "a stop signal (on another rank)"
                return last_loss, self.checkpoints.stop(self.step, signal_name, mon), True
            for generator in run.generators:
                m = self.micro_loss(next(batches), generator)
                e.backward(m.loss)
                window.add(m)
            result = e.step()  # the engine discards the whole window when any of its losses was non-finite
            if result.skipped:
                window.discard()
                bad_in_a_row += 1
                mon.message(f"step {self.step}: non-finite loss, update skipped ({e.skipped_steps} so far)")
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"the loss was non-finite in {bad_in_a_row} optimizer steps in a row at step {self.step}; "
                        f"stopping. The last good checkpoint ({latest_checkpoint(run.run_dir)}) is intact: lower "
                        "optim.lr, check the data, or resume from it."
                    )
                continue
            bad_in_a_row = 0
            window.commit()
            if e.ema is not None:
                e.ema.update()
            self.step += 1
            mon.advance()
            if self.step == 1:
                mon.record(self.step, {"precision": r.distributed.precision, "weights_dtype": str(e.working_dtype),
                                       "compute_dtype": str(run.velocity.last_dtype)})
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                last_loss = self.metrics.log(self.step, result)
            # The last validation comes before the last checkpoint, which records the weights it found better.
            if (t.validate_every and self.step % t.validate_every == 0) or self.step == t.max_steps:
                self.validator.validate(self.step)
            checkpoint_now = self.step % t.checkpoint_every == 0 or self.step == t.max_steps
            if t.ema_profiles and not checkpoint_now and t.ema_snapshot_every and self.step % t.ema_snapshot_every == 0:
                write_snapshot(e, run.run_dir, self.step, t.ema_profiles)  # a checkpoint takes its own
            if checkpoint_now:
                last_ckpt = self.checkpoints.save(self.step)
        if self.validator.last_step != self.step:  # a finished run resumed: nothing trained, validate anyway
            self.validator.validate(self.step)
        return last_loss, last_ckpt, False

    def flops_per_step(self) -> float:
        """Estimated training FLOPs of one optimizer step (global batch), for throughput and MFU logging.

        Sized on a meta-device copy: the engine's model may be sharded (ZeRO-3), which hides parameter sizes.
        """
        r, run = self.recipe, self.run
        height, width = r.data.size
        f = run.encoders.downsample
        prompts = run.encoders.encode_text(r.sampling.prompts[:16])
        text_len = max(1, round(prompts.mask.sum().item() / len(prompts)))  # validation prompts' mean length
        # the family's analytic count (MMDiT; the frozen base and the adapters with LoRA) or one counted
        # meta-device forward (U-Net)
        return training_flops(r.model, r.model.lora, batch_size=r.train.batch_size,
                              latent_size=(height // f, width // f), text_len=text_len)


def train(recipe: Recipe) -> TrainSummary:
    """Train a recipe (resuming from run_dir's newest checkpoint) and return a summary."""
    with assemble(recipe) as run:  # shuts the process group down cleanly and releases run_dir's lock
        return Trainer(run).fit()
