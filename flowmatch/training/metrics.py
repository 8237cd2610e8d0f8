"""The trainer's metrics: logged losses summed on the device, reduced across ranks once per log step, recorded,
and judged for divergence.

Between log steps nothing is read back from the device: the losses of each optimizer step wait in a
:class:`LossWindow` until the engine says whether it applied the update, and :meth:`Metrics.log` reduces the window
(the loop's one host sync per log interval), records the scalars and asks :class:`DivergenceWatch` about them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from flowmatch.checkpoint import latest_checkpoint
from flowmatch.data import Loader
from flowmatch.flow import ObjectiveLoss
from flowmatch.monitor import Monitor
from flowmatch.training.checkpointing import TrainingError
from flowmatch.training.config import TrainConfig
from flowmatch.training.divergence import Diverged, DivergenceWatch

if TYPE_CHECKING:
    from flowmatch.engine import Engine

# Loss is also logged per timestep bucket (quarters of [0, 1]) to see which noise levels train slowly.
LOSS_BUCKETS = 4


class LossWindow:
    """Sums of the logged losses since the last log step, kept on the device (no host sync to add to them).

    The micro batches of one optimizer step are held apart until the engine says whether it applied the update:
    :meth:`commit` adds them to the sums, :meth:`discard` drops them (a window with a non-finite loss). The last
    entry holds the mean loss of the window's first committed step (what divergence is measured against).
    """

    def __init__(self, device: torch.device, buckets: int = LOSS_BUCKETS) -> None:
        self.buckets = buckets
        # loss sum, loss count, per-bucket sums, per-bucket counts, the first step's loss
        self.sums = torch.zeros(3 + 2 * buckets, device=device)
        self.pending = torch.zeros_like(self.sums)
        self.steps = 0
        self.started = time.time()

    def add(self, m: ObjectiveLoss) -> None:
        p, nb = self.pending, self.buckets
        p[0] += m.loss.detach()
        p[1] += 1
        bucket = (m.t * nb).long().clamp(max=nb - 1)
        p[2:2 + nb].index_add_(0, bucket, m.per_sample)
        p[2 + nb:].index_add_(0, bucket, torch.ones_like(m.per_sample))

    def commit(self) -> None:
        self.sums += self.pending
        if self.steps == 0:
            self.sums[-1] = self.pending[0] / self.pending[1].clamp(min=1)
        self.pending.zero_()
        self.steps += 1

    def discard(self) -> None:
        self.pending.zero_()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0
        self.started = time.time()


class Metrics:
    """The loop's metrics beside the trainer: it owns the :class:`LossWindow`, reduces and records it at each log
    step, and judges the logged values for divergence.

    Args:
        engine: the run's engine (rank reductions, learning rate, skipped-update count).
        loader: the run's loader (its ``stats``: this rank's bad records, failed shards, samples per source).
        train: the ``train`` section (batch size, divergence limits).
        peak_tflops: ``logging.peak_tflops`` of one device (0: no MFU).
        monitor: where scalars and warnings go.
        run_dir: the run directory (named in the divergence error with its last checkpoint).
        flops_per_step: estimated training FLOPs of one optimizer step (global batch).
    """

    def __init__(self, engine: Engine, loader: Loader, train: TrainConfig, peak_tflops: float, monitor: Monitor,
                 run_dir: Path, flops_per_step: float) -> None:
        self.engine = engine
        self.loader = loader
        self.batch_size = train.batch_size
        self.peak_tflops = peak_tflops
        self.monitor = monitor
        self.run_dir = run_dir
        self.flops_per_step = flops_per_step
        self.window = LossWindow(engine.device)
        self.divergence = DivergenceWatch(train.divergence_factor, train.max_bad_windows)
        self.skipped_at_log = engine.skipped_steps
        """The engine's skipped-update count at the last log step."""

    def log(self, step: int, result) -> float:
        """Reduce the window's sums across ranks, record them and judge them, then start a new window: the loop's
        host sync, once per log interval. Returns the window's mean loss."""
        e, window = self.engine, self.window
        nb = window.buckets
        data = self.loader.stats  # this rank's counters: bad records, failed shards, samples per source
        sums = e.all_reduce_sum(window.sums).cpu()
        # float64: sample counts pass 2^24 early in a large run
        tallies = e.all_reduce_sum(torch.tensor([data.bad, data.failed_shards, *data.sources.values()],
                                                dtype=torch.float64, device=e.device)).cpu()
        seconds = max(time.time() - window.started, 1e-9)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        counts = sums[2 + nb:2 + 2 * nb]
        buckets = sums[2:2 + nb] / counts.clamp(min=1)
        samples_per_s = window.steps * self.batch_size / seconds
        tflops = window.steps * self.flops_per_step / seconds / 1e12
        values = {"loss": loss, "lr": e.lr, "samples_per_s": samples_per_s, "tflops_per_s": tflops}
        postfix = {"loss": f"{loss:.4f}", "lr": f"{e.lr:.2e}", "samples/s": f"{samples_per_s:.0f}"}
        if self.peak_tflops > 0:
            values["mfu"] = tflops / (self.peak_tflops * e.world_size)
            postfix["mfu"] = f"{values['mfu']:.1%}"
        values["bad_samples"] = tallies[0].item()
        values["failed_shards"] = tallies[1].item()
        if len(data.sources) > 1:  # a mixture: how many samples each source has given so far
            for name, total in zip(data.sources, tallies[2:].tolist()):
                values[f"samples_{name}"] = total
        values["skipped_steps"] = float(e.skipped_steps)
        if result is not None and result.grad_norm is not None:
            values["grad_norm"] = float(result.grad_norm)
        for i, (v, n) in enumerate(zip(buckets.tolist(), counts.tolist())):
            if n > 0:  # a bucket no sample fell in this window has no loss to report
                values[f"loss_t{i}"] = v
        self.monitor.scalars(step, values, postfix=postfix)
        self.judge(step, loss, values.get("grad_norm"), (sums[-1] / e.world_size).item())
        window.reset()
        return loss

    def judge(self, step: int, loss: float, grad_norm: Optional[float], first_loss: float) -> None:
        """Warn about a diverging log window; raise TrainingError after train.max_bad_windows in a row (values
        already on the host: see :mod:`.divergence`)."""
        skipped, self.skipped_at_log = self.engine.skipped_steps - self.skipped_at_log, self.engine.skipped_steps
        try:
            warning = self.divergence.judge(step, loss, grad_norm, first_loss, skipped)
        except Diverged as err:
            last = latest_checkpoint(self.run_dir)
            raise TrainingError(f"{err} " + (f"The last checkpoint is {last}." if last else "No checkpoint was written "
                                             "yet.")) from None
        if warning:
            self.monitor.message(f"warning: {warning}")
