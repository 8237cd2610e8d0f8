"""The process group of a job: who this process is, where its tensors live, and the collectives between ranks.

Launching: :mod:`.launch` reads this process's place in the job from torchrun, the deepspeed launcher or SLURM
and runs the rendezvous when no torchrun agent does; a plain ``python`` process becomes a one-process group on a
free local port so that DeepSpeed code paths are the same everywhere. gloo is used on CPU, NCCL on GPUs. Every
``torch.distributed`` call of the engine is made in this module (DeepSpeed makes its own).
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.failure import start_abort_watch, stop_abort_watch
from flowmatch.engine.launch import detect_launch, export, rendezvous

T = TypeVar("T")


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


class ProcessGroup:
    """This process's place in the job: joins (or, for a plain single process, creates) the process group.

    All methods documented as collective must be called by every rank in the same order.

    Attributes:
        deepspeed: the imported ``deepspeed`` package, its communication set up on this group.
    """

    def __init__(self, cfg: DistributedConfig) -> None:
        on_cuda = torch.cuda.is_available()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if on_cuda else "gloo")
        if backend == "nccl" and not on_cuda:
            raise ValueError("distributed.backend is nccl but no CUDA device is visible: use backend auto or gloo")
        if cfg.precision == "fp16" and not on_cuda:
            raise ValueError("distributed.precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        info = detect_launch(os.environ)
        self._set_env = export(info, os.environ)  # variables this group added, removed again by shutdown()
        self._rank, self._world_size, self._local_rank = info.rank, info.world_size, info.local_rank
        self.launcher = info.launcher
        self._device = torch.device("cuda", self._local_rank) if backend == "nccl" else torch.device("cpu")
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._backend = backend
        timeout = timedelta(seconds=cfg.timeout_s)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            extra: dict[str, Any] = {"device_id": self._device} if backend == "nccl" else {}
            if info.world_size > 1 and info.launcher != "torchrun":
                # torchrun's agent runs the rendezvous; for every other launcher rank 0 hosts it, with a deadline.
                extra.update(store=rendezvous(info, cfg.rendezvous_timeout_s), rank=info.rank,
                             world_size=info.world_size)
            elif info.world_size == 1 and info.launcher != "torchrun":
                # One process needs no rendezvous: an in-memory store opens no port, so two runs starting at once
                # cannot race for the free port picked for MASTER_PORT (EADDRINUSE); torchrun's agent hosts its own.
                extra.update(store=dist.HashStore(), rank=0, world_size=1)
            dist.init_process_group(backend, timeout=timeout, **extra)
        self.deepspeed = _import_deepspeed()
        if backend == "gloo":
            # DeepSpeed JIT-compiles a shared-memory all-reduce (about a minute) that only its inference engine
            # uses; training collectives go through torch.distributed. Writing the entry without reading the table
            # also spares every process DeepSpeed's probe of all its ops (a test C program compiled and linked, and
            # setuptools imported: ~0.06 s of CPU), whose one reader is this shared-memory check.
            vars(self.deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        self.deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        self._closed = False
        store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
        if self._world_size > 1 and store is not None:
            start_abort_watch(store, self._rank)

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

    def barrier(self) -> None:
        """Collective: wait until every rank gets here."""
        dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise sum of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise mean of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self.all_reduce_sum(t) / self._world_size

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise minimum of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self._all_reduce(t, dist.ReduceOp.MIN)

    def _all_reduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        out = t.detach().clone()
        if self._world_size > 1:
            dist.all_reduce(out, op=op)
        return out

    def reduce_sum_to(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """Collective: on rank ``dst`` a new tensor holding the elementwise sum of ``t`` over ranks (elsewhere
        a scratch tensor); ``t`` on :attr:`device`."""
        out = t.detach().clone()
        if self._world_size > 1:
            dist.reduce(out, dst=dst, op=dist.ReduceOp.SUM)
        return out

    def all_gather_flat(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: every rank's ``t`` (same shape on all ranks), concatenated along dim 0 in rank order.

        Runs on :attr:`device`: a tensor held in CPU memory (e.g. offloaded) travels there first, since NCCL cannot
        send from the CPU; the result is on :attr:`device`.
        """
        if self._world_size == 1:
            return t
        local = t.to(self._device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self._world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

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
                self.deepspeed.utils.groups._WORLD_GROUP = None
        self.restore_env()

    def restore_env(self) -> None:
        """Remove the launcher variables this group set for a plain process (also when the job failed)."""
        # Processes this one starts later (a CLI call from a test, a sampler) must not take themselves for ranks
        # of this job and try to host its store on the same port.
        for key in self._set_env:
            os.environ.pop(key, None)
        self._set_env = []
