"""The trainable model wrapped by DeepSpeed with AdamW and the learning-rate schedule: forward, backward, step.

A non-finite loss anywhere in an accumulation window discards the whole window on every rank (see
:mod:`.nonfinite`); ``step()`` says what happened in a :class:`StepResult`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowmatch.engine.config import DistributedConfig, build_deepspeed_config
from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.nonfinite import FiniteWindow
from flowmatch.engine.optim import OptimConfig, SkippableAdamW, SkippableLambdaLR, lr_factor

# DeepSpeed writes its own files under this tag inside the directory given to save_deepspeed.
_DS_TAG = "deepspeed"


@dataclass
class StepResult:
    """What :meth:`flowmatch.engine.Engine.step` did.

    Attributes:
        stepped: the optimizer applied an update (every loss of the window was finite on every rank).
        skipped: the window contained a non-finite loss and was discarded: nothing changed.
        grad_norm: global L2 norm of the gradients before clipping, when ``stepped``; else None.
    """

    stepped: bool
    skipped: bool
    grad_norm: float | None


class Trainable:
    """Collective construction: wrap ``model`` with DeepSpeed, AdamW and the learning-rate schedule.

    Args:
        cfg: the ``distributed`` settings.
        group: the process group (DeepSpeed is initialised on it).
        model: the trainable module (built inside ``model_init`` for ZeRO-3), on any device.
        params: parameters, or AdamW param-group dicts (e.g. no weight decay for norms).
        optim: AdamW settings (``lr`` is the peak), the schedule and gradient clipping.
        max_steps: updates the schedule runs over (see :func:`~flowmatch.engine.optim.lr_factor`).
        micro_batch_size: samples per rank per forward; the global batch is
            ``micro_batch_size * grad_accum_steps * world_size``.
        grad_accum_steps: micro-batches per optimizer update.
    """

    def __init__(self, cfg: DistributedConfig, group: ProcessGroup, model: torch.nn.Module,
                 params: Iterable[Any], optim: OptimConfig, *, max_steps: int, micro_batch_size: int,
                 grad_accum_steps: int) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        on_cuda = group.device.type == "cuda"
        ds_config = build_deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                           world_size=group.world_size, grad_clip=optim.grad_clip, on_cuda=on_cuda)
        self._own_clip: float | None = None
        if cfg.zero_stage == 0 and cfg.precision == "fp32":
            # DeepSpeed steps a bare optimizer here and clips without reporting the norm: clip in step() instead.
            self._own_clip = optim.grad_clip if optim.grad_clip > 0 else math.inf
            ds_config["gradient_clipping"] = 0.0
        if cfg.zero_stage != 3:
            model = model.to(group.device)
        fused = on_cuda and not cfg.offload_optimizer
        optimizer = SkippableAdamW(list(params), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                   weight_decay=optim.weight_decay, **({"fused": True} if fused else {"foreach": True}))
        factor = functools.partial(lr_factor, optim=optim, max_steps=max_steps)
        made: list[SkippableLambdaLR] = []

        def make_scheduler(opt: torch.optim.Optimizer) -> SkippableLambdaLR:
            made.append(SkippableLambdaLR(opt, factor))
            return made[0]

        # Without ZeRO, DeepSpeed's bf16/fp16 wrapper creates the AdamW state by stepping once on zero gradients,
        # which would count as an update in AdamW's bias correction and apply weight decay: make it a no-op.
        optimizer.overflow = cfg.zero_stage == 0
        try:
            self._ds, _, _, _ = group.deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=make_scheduler, config=ds_config,
                                                           dist_init_required=False)
        finally:
            optimizer.overflow = False
        self._optimizer, self._scheduler = optimizer, made[0]
        self._accum = grad_accum_steps
        self._micro = 0  # backward() calls in the current accumulation window
        self._window = FiniteWindow(group)
        self._skipped_steps = 0
        self._named_params = list(self._ds.module.named_parameters())

    @property
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters of the wrapped model, in a fixed order (partitioned under ZeRO-3)."""
        return self._named_params

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (partitioned under ZeRO-3)."""
        return self._ds.module

    @property
    def working_dtype(self) -> torch.dtype:
        """Dtype of the working weights as they are in the model (observed, not configured)."""
        return next(p.dtype for _, p in self.named_params)

    @property
    def in_window(self) -> bool:
        """Whether backward() ran since the last step(): the state is then mid-window."""
        return self._micro > 0

    def train(self) -> None:
        """Put the model in training mode."""
        self._ds.train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self._ds.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model through DeepSpeed (which gathers ZeRO-3 partitions as needed); all ranks must call it."""
        return self._ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Collective: backpropagate one micro-batch's scalar ``loss``, noting on the device whether it is finite."""
        if self._micro == self._accum:
            raise RuntimeError(f"backward() called {self._accum + 1} times without step(): this engine accumulates "
                               f"{self._accum} micro-batch(es) per update")
        self._ds.backward(self._window.record(loss))
        self._micro += 1
        if self._micro < self._accum:
            # DeepSpeed counts micro-batches by its own step() calls (a no-op before the boundary); making that call
            # here lets the loop call step() once per update, as with a torch optimizer.
            self._ds.step()

    def step(self) -> StepResult:
        """Collective: apply the update of the window, or discard it when any of its losses was non-finite."""
        if self._micro != self._accum:
            raise RuntimeError(f"step() after {self._micro} backward() call(s): this engine accumulates "
                               f"{self._accum} micro-batch(es) per update, call backward() once for each")
        skip = not self._window.agree()  # the step's one read-back of the window's verdict
        norm: Any = None
        if self._own_clip is not None and not skip:
            params = [p for _, p in self.named_params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self._own_clip)
        self._optimizer.overflow = self._scheduler.skip_next = skip
        try:
            self._ds.step()
        finally:
            self._optimizer.overflow = self._scheduler.skip_next = False
        self._micro = 0
        if skip:
            self._skipped_steps += 1
            return StepResult(stepped=False, skipped=True, grad_norm=None)
        if norm is None:
            norm = self._ds.get_global_grad_norm()
        # DeepSpeed's step has synchronised with the host already (overflow check, clipping), as has agree().
        return StepResult(stepped=True, skipped=False, grad_norm=None if norm is None else float(norm))

    @property
    def lr(self) -> float:
        """Learning rate the next update uses (of the first param group)."""
        return float(self._optimizer.param_groups[0]["lr"])

    @property
    def optimizer_steps(self) -> int:
        """Updates applied so far."""
        return int(self._scheduler.last_epoch)

    @property
    def skipped_steps(self) -> int:
        """Accumulation windows discarded for a non-finite loss so far."""
        return self._skipped_steps

    @property
    def global_steps(self) -> int:
        """DeepSpeed's own count of step boundaries, applied or not."""
        return int(self._ds.global_steps)

    def restore_counts(self, *, skipped_steps: int, optimizer_steps: int | None = None,
                       global_steps: int | None = None) -> None:
        """Set the counters of a resumed run; ``optimizer_steps`` also moves the schedule to that position (when
        DeepSpeed's own scheduler state could not be loaded)."""
        self._skipped_steps = skipped_steps
        if optimizer_steps is not None:
            self._scheduler.set_position(optimizer_steps)
        if global_steps is not None:
            self._ds.global_steps = global_steps

    def refresh_masters(self) -> None:
        """Copy the working weights into the fp32 masters (after writing the working weights directly)."""
        optimizer = self._ds.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()

    def save_deepspeed(self, directory: Path) -> None:
        """Collective: DeepSpeed's model, optimizer and scheduler state into ``directory/deepspeed``."""
        self._ds.save_checkpoint(str(directory), tag=_DS_TAG, save_latest=False)

    def load_deepspeed(self, directory: Path) -> None:
        """Collective: restore what :meth:`save_deepspeed` wrote (same ZeRO stage, world size and precision)."""
        # DeepSpeed reads its files with torch.load(weights_only=False): they hold pickled optimizer state and
        # config objects. Only files this project's runs wrote into the run directory are read here.
        path, _ = self._ds.load_checkpoint(str(directory), tag=_DS_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {directory / _DS_TAG}")
