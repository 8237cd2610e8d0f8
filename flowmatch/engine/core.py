"""The :class:`Engine`: process group, DeepSpeed wrapping of the trainable model, collectives and the update step.

Its EMA, whole-weight and save/load methods live in :mod:`.ema`, :mod:`.weights` and :mod:`.state` as mixins, so
that each concern reads on its own; :class:`Engine` is the only class that combines them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from flowmatch.ema import ShadowEma
from flowmatch.engine.config import DistributedConfig, build_deepspeed_config
from flowmatch.engine.ema import EmaMixin
from flowmatch.engine.failure import start_abort_watch, stop_abort_watch
from flowmatch.engine.optim import SCHEDULES, SkippableAdamW, SkippableLambdaLR, lr_factor
from flowmatch.engine.state import TrainingStateMixin
from flowmatch.engine.weights import WeightsMixin

T = TypeVar("T")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """What :meth:`Engine.step` did.

    Attributes:
        stepped: the optimizer applied an update (every loss of the window was finite).
        skipped: the window contained a non-finite loss and was discarded: nothing changed.
        grad_norm: global L2 norm of the gradients before clipping, when ``stepped``; else None.
    """

    stepped: bool
    skipped: bool
    grad_norm: float | None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _UntestedOptimizerNotice(logging.Filter):
    """Drops DeepSpeed's warning about a client optimizer: ours is torch's AdamW, see build_deepspeed_config."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _import_deepspeed() -> Any:
    """Import DeepSpeed lazily (it takes seconds and probes the hardware) and quiet its routine chatter."""
    if not torch.cuda.is_available():
        # On a CUDA build of torch without a GPU, say CPU outright instead of relying on the probe.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _UntestedOptimizerNotice) for f in ds_logger.filters):
        ds_logger.addFilter(_UntestedOptimizerNotice())
    # DeepSpeed calls torch.distributed collectives under their deprecated names on every step; nothing to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


class Engine(TrainingStateMixin, EmaMixin, WeightsMixin):
    """One process's handle on the distributed job and on the DeepSpeed-wrapped trainable model.

    Creating it joins (or, for a plain single process, creates) the process group; :meth:`setup` wraps the
    model; :meth:`shutdown` (or leaving a ``with Engine(...)`` block normally) tears the group down.
    All methods documented as collective must be called by every rank in the same order.
    """

    def __init__(self, cfg: DistributedConfig) -> None:
        self.cfg = cfg
        on_cuda = torch.cuda.is_available()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if on_cuda else "gloo")
        if backend == "nccl" and not on_cuda:
            raise ValueError("distributed.backend is nccl but no CUDA device is visible: use backend auto or gloo")
        if cfg.precision == "fp16" and not on_cuda:
            raise ValueError("distributed.precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        self._set_env: list[str] = []  # variables this engine added, removed again by shutdown()
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            # A plain `python` process: make it a one-process group so DeepSpeed runs the same code paths.
            single = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
            self._set_env = [k for k in single if k not in os.environ]
            os.environ.update(single)
        self._rank = int(os.environ["RANK"])
        self._world_size = int(os.environ["WORLD_SIZE"])
        self._local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._device = torch.device("cuda", self._local_rank) if backend == "nccl" else torch.device("cpu")
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._backend = backend
        timeout = timedelta(seconds=cfg.timeout_s)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            extra = {"device_id": self._device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=timeout, **extra)
        self._ds_lib = _import_deepspeed()
        if backend == "gloo":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (about a minute) that only its inference engine
            # uses; training collectives go through torch.distributed.
            self._ds_lib.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self._ds_lib.init_distributed(dist_backend=backend, timeout=timeout)
        self._ds: Any = None
        self._optimizer: SkippableAdamW | None = None
        self._scheduler: SkippableLambdaLR | None = None
        self._named_params: list[tuple[str, torch.nn.Parameter]] = []
        self._own_clip: float | None = None
        self._accum = 1
        self._micro = 0  # backward() calls in the current accumulation window
        self._window_bad = False
        self._skipped_steps = 0
        self._ema: ShadowEma | None = None
        self._ema_backup: list[torch.Tensor] | None = None
        self._closed = False
        store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
        if self._world_size > 1 and store is not None:
            start_abort_watch(store, self._rank)

    # -- process facts and collectives ---------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Global rank of this process, 0 .. world_size - 1."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of processes in the job."""
        return self._world_size

    @property
    def local_rank(self) -> int:
        """Rank of this process on its node (selects the GPU)."""
        return self._local_rank

    @property
    def device(self) -> torch.device:
        """Device that holds this rank's model and batches (``cuda:<local_rank>`` with NCCL, else CPU)."""
        return self._device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, which writes files and logs."""
        return self._rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the working weights: cast floating inputs of :meth:`forward` to it."""
        return _DTYPES[self.cfg.precision]

    def barrier(self) -> None:
        """Collective: wait until every rank gets here."""
        dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise sum of ``t`` over ranks (``t`` on :attr:`device`)."""
        out = t.detach().clone()
        if self._world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise mean of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self.all_reduce_sum(t) / self._world_size

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Collective: rank ``src``'s ``obj`` on every rank (picklable; only ever exchanged between our ranks)."""
        if self._world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._device if self._backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        """Collective: every rank's ``obj`` (picklable), indexed by rank, on every rank."""
        if self._world_size == 1:
            return [obj]
        out: list[Any] = [None] * self._world_size
        dist.all_gather_object(out, obj)
        return out

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Collective: True when ``loss`` is finite on every rank, so all ranks take the same branch.

        Costs one tiny all-reduce and a host sync.
        """
        flag = torch.isfinite(loss.detach()).all().to(device=self._device, dtype=torch.float32).reshape(1)
        if self._world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, param_groups_or_params: Iterable[Any], *, lr: float,
              betas: tuple[float, float], weight_decay: float, eps: float, warmup_steps: int, max_steps: int,
              schedule: str, min_lr_ratio: float, micro_batch_size: int, grad_accum_steps: int,
              grad_clip: float) -> None:
        """Collective: wrap ``model`` with DeepSpeed, AdamW and the learning-rate schedule.

        Args:
            model: the trainable module (built inside :meth:`model_init` for ZeRO-3), on any device.
            param_groups_or_params: parameters, or AdamW param-group dicts (e.g. no weight decay for norms).
            lr, betas, weight_decay, eps: AdamW settings; ``lr`` is the peak learning rate.
            warmup_steps, max_steps, schedule, min_lr_ratio: see :func:`lr_factor`.
            micro_batch_size: samples per rank per forward; the global batch is
                ``micro_batch_size * grad_accum_steps * world_size``.
            grad_accum_steps: micro-batches per optimizer update.
            grad_clip: clip the global gradient norm to this value; <= 0 disables clipping.
        """
        if self._ds is not None:
            raise RuntimeError("Engine.setup was already called; create one Engine per model")
        if warmup_steps < 0 or max_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0, max_steps >= 1 and min_lr_ratio in [0, 1], got "
                             f"{warmup_steps}, {max_steps}, {min_lr_ratio}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        on_cuda = self._device.type == "cuda"
        ds_config = build_deepspeed_config(self.cfg, micro_batch_size=micro_batch_size,
                                           grad_accum_steps=grad_accum_steps, world_size=self._world_size,
                                           grad_clip=grad_clip, on_cuda=on_cuda)
        if self.cfg.zero_stage == 0 and self.cfg.precision == "fp32":
            # DeepSpeed steps a bare optimizer here and clips without reporting the norm: clip in step() instead.
            self._own_clip = grad_clip if grad_clip > 0 else math.inf
            ds_config["gradient_clipping"] = 0.0
        if self.cfg.zero_stage != 3:
            model = model.to(self._device)
        fused = on_cuda and not self.cfg.offload_optimizer
        optimizer = SkippableAdamW(list(param_groups_or_params), lr=lr, betas=betas, eps=eps,
                                   weight_decay=weight_decay, **({"fused": True} if fused else {"foreach": True}))
        factor = functools.partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                                   min_lr_ratio=min_lr_ratio)
        made: list[SkippableLambdaLR] = []

        def make_scheduler(opt: torch.optim.Optimizer) -> SkippableLambdaLR:
            made.append(SkippableLambdaLR(opt, factor))
            return made[0]

        # Without ZeRO, DeepSpeed's bf16/fp16 wrapper creates the AdamW state by stepping once on zero gradients,
        # which would count as an update in AdamW's bias correction and apply weight decay: make it a no-op.
        optimizer.overflow = self.cfg.zero_stage == 0
        try:
            self._ds, _, _, _ = self._ds_lib.initialize(model=model, optimizer=optimizer,
                                                        lr_scheduler=make_scheduler, config=ds_config,
                                                        dist_init_required=False)
        finally:
            optimizer.overflow = False
        self._optimizer, self._scheduler = optimizer, made[0]
        self._accum = grad_accum_steps
        self._named_params = list(self._ds.module.named_parameters())

    def _require_setup(self) -> Any:
        if self._ds is None:
            raise RuntimeError("call Engine.setup(model, ...) first")
        return self._ds

    def _require_trainable_weights(self) -> None:
        if self._ema_backup is not None:
            raise RuntimeError("EMA weights are swapped in: call ema_swap() again (or leave ema_weights()) first")

    # -- training step ----------------------------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (partitioned under ZeRO-3: see :meth:`gathered_params`)."""
        return self._require_setup().module

    def train(self) -> None:
        """Put the model in training mode."""
        self._require_setup().train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self._require_setup().eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model through DeepSpeed (which gathers ZeRO-3 partitions as needed); all ranks must call it."""
        return self._require_setup()(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, check_finite: bool = True) -> bool:
        """Collective: backpropagate one micro-batch's scalar ``loss``; returns whether it was finite on all ranks.

        Call it ``grad_accum_steps`` times (one per micro-batch), then :meth:`step` once. Gradients are averaged
        over micro-batches and ranks. A non-finite loss on any rank marks the window bad on every rank: the
        next :meth:`step` discards it and weights, AdamW state and the schedule stay as they were.
        ``check_finite=False`` skips the check (one tiny all-reduce and host sync) when the caller has already
        called :meth:`all_finite` on this loss.
        """
        ds = self._require_setup()
        self._require_trainable_weights()
        if self._micro == self._accum:
            raise RuntimeError(f"backward() called {self._accum + 1} times without step(): this engine accumulates "
                               f"{self._accum} micro-batch(es) per update")
        finite = self.all_finite(loss) if check_finite else True
        if not finite:
            self._window_bad = True
            # Still run backward, on a NaN loss: DeepSpeed's ZeRO optimizers fail on a window without any
            # backward, and NaN gradients take their overflow path, which discards everything accumulated.
            loss = loss * float("nan")
        ds.backward(loss)
        self._micro += 1
        if self._micro < self._accum:
            # DeepSpeed counts micro-batches by its own step() calls (a no-op before the boundary); making that call
            # here lets the loop call step() once per update, as with a torch optimizer.
            ds.step()
        return finite

    def step(self) -> StepResult:
        """Collective: apply the update of the window of micro-batches passed to :meth:`backward` (or discard it).

        The LR schedule advances only with applied updates.
        """
        ds = self._require_setup()
        self._require_trainable_weights()
        if self._micro != self._accum:
            raise RuntimeError(f"step() after {self._micro} backward() call(s): this engine accumulates "
                               f"{self._accum} micro-batch(es) per update, call backward() once for each")
        norm: Any = None
        if self._own_clip is not None:
            params = [p for _, p in self._named_params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self._own_clip)
        skip = self._window_bad
        assert self._optimizer is not None and self._scheduler is not None
        self._optimizer.overflow = self._scheduler.skip_next = skip
        try:
            ds.step()
        finally:
            self._optimizer.overflow = self._scheduler.skip_next = False
        self._micro, self._window_bad = 0, False
        if skip:
            self._skipped_steps += 1
            return StepResult(stepped=False, skipped=True, grad_norm=None)
        if norm is None:
            norm = ds.get_global_grad_norm()
        # DeepSpeed's step has already synchronised with the host (overflow check), so float() costs nothing more.
        return StepResult(stepped=True, skipped=False, grad_norm=None if norm is None else float(norm))

    @property
    def lr(self) -> float:
        """Learning rate the next update uses (of the first param group)."""
        self._require_setup()
        assert self._optimizer is not None
        return float(self._optimizer.param_groups[0]["lr"])

    @property
    def optimizer_steps(self) -> int:
        """Updates applied so far (restored by :meth:`load`)."""
        self._require_setup()
        assert self._scheduler is not None
        return int(self._scheduler.last_epoch)

    @property
    def skipped_steps(self) -> int:
        """Accumulation windows discarded for a non-finite loss so far (restored by :meth:`load`)."""
        return self._skipped_steps

    def shutdown(self) -> None:
        """Collective: wait for all ranks, then leave the process group. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        stop_abort_watch()
        if dist.is_initialized():
            dist.barrier()
            if self._owns_group:
                dist.destroy_process_group()
                # DeepSpeed keeps a clone of the world group for the life of the process; it dies with this group,
                # and a later Engine in this process (train() called twice) must not reuse it.
                self._ds_lib.utils.groups._WORLD_GROUP = None
        self._restore_env()

    def _restore_env(self) -> None:
        # Processes this one starts later (a CLI call from a test, a sampler) must not take themselves for ranks
        # of this job and try to host its store on the same port.
        for key in self._set_env:
            os.environ.pop(key, None)
        self._set_env = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self._restore_env()
