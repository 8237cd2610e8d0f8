"""The distributed engine: the only module that touches DeepSpeed and ``torch.distributed``.

The training loop sees a small API: process facts (``rank``, ``world_size``, ``device``), a few collectives,
``setup`` (wraps the trainable model in DeepSpeed with AdamW and a warmup + cosine/constant schedule),
``forward`` / ``backward`` / ``step``, an fp32 EMA, consolidated state dicts for export, and ``save`` / ``load``
of the full training state. Frozen modules (text encoder, autoencoder) never enter the engine: they are built
outside :meth:`Engine.model_init` and so are neither partitioned nor given optimizer state, under any ZeRO stage.

Launching: ``torchrun`` and the ``deepspeed`` launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, which the engine reads; a plain ``python`` process becomes a one-process group on a free local port
so that DeepSpeed code paths are the same everywhere. gloo is used on CPU, NCCL on GPUs.

Failure handling: wrap each process's main in :func:`run_guarded`. A rank that raises prints its traceback,
leaves a notice in the rendezvous store and exits; every other rank sees the notice (or the store vanishing)
within about a second and exits non-zero too, instead of blocking in a collective until ``timeout_s``.

Usage (every rank runs the same code; checkpoint files are laid out by :mod:`flowmatch.checkpoint`)::

    def main():
        with Engine(DistributedConfig(zero_stage=2)) as engine:   # leaving the block calls engine.shutdown()
            with engine.model_init():                 # ZeRO-3: modules built here are partitioned on creation
                model = MMDiT(cfg.model)
            with engine.gathered_params(model, modify=True):
                model.init_weights()                  # rank 0's init is kept (a no-op wrapper below ZeRO-3)
            engine.setup(model, model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
                         warmup_steps=100, max_steps=10_000, schedule="cosine", min_lr_ratio=0.1,
                         micro_batch_size=8, grad_accum_steps=2, grad_clip=1.0)
            engine.ema_init(0.9999)
            step, ckpt = 0, latest_checkpoint(run_dir)
            if ckpt is not None:                      # weights, AdamW, schedule, EMA, RNG; returns client_state
                step = load_checkpoint(engine, ckpt)["step"]
            while step < max_steps:
                for _ in range(2):                    # grad_accum_steps micro-batches per update
                    loss = loss_fn(engine.forward(x, t, ctx, pooled), target)
                    engine.backward(loss)             # a non-finite loss (on any rank) poisons the window
                result = engine.step()                # one update per window, like a torch optimizer
                if result.stepped:
                    engine.ema_update()
                    step += 1
                elif result.skipped:
                    bad_steps += 1                    # weights, moments and LR schedule are untouched
                if step % checkpoint_every == 0:
                    save_checkpoint(engine, run_dir, step, client_state={"step": step, "data": loader.state_dict()},
                                    recipe_yaml=recipe_yaml, keep=2, ema=True)

    run_guarded(main)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import random
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowmatch.ema import ShadowEma

log = logging.getLogger(__name__)

T = TypeVar("T")

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "gloo", "nccl")
SCHEDULES = ("cosine", "constant")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSpeed writes its own files under this tag inside the directory given to Engine.save.
_DS_TAG = "deepspeed"
_STATE_FORMAT = 1
# How often each rank looks for another rank's failure notice. One second is prompt next to a collective
# timeout of minutes and costs one tiny store request per second.
_ABORT_POLL_S = 1.0
# How long a failing rank spends trying to leave its notice before it exits anyway.
_ABORT_PUBLISH_S = 5.0
# fp16 dynamic loss scaling starts at 2**16 (DeepSpeed's default initial_scale_power).
_FP16_INITIAL_SCALE_POWER = 16


@dataclass
class DistributedConfig:
    """How training is sharded and launched (recipe section ``distributed``)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also weights."""
    precision: str = "fp32"
    """Dtype of the working weights and activations: fp32 | bf16 | fp16 (fp16 needs CUDA); masters stay fp32."""
    offload_optimizer: bool = False
    """Keep optimizer state (fp32 masters and AdamW moments) in CPU memory; needs zero_stage 1-3."""
    offload_params: bool = False
    """Keep partitioned weights in CPU memory between uses; needs zero_stage 3."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl when CUDA is available, else gloo) | gloo | nccl."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before the job fails."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's default, 1e5)."""

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"distributed.{field} must be {allowed}, got {getattr(self, field)!r}")

        if isinstance(self.zero_stage, bool) or self.zero_stage not in ZERO_STAGES:
            raise bad("zero_stage", "one of 0, 1, 2, 3")
        if self.precision not in PRECISIONS:
            raise bad("precision", "one of " + ", ".join(PRECISIONS))
        if self.backend not in BACKENDS:
            raise bad("backend", "one of " + ", ".join(BACKENDS))
        for field in ("offload_optimizer", "offload_params"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "true or false")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"distributed.offload_params needs zero_stage 3 (only ZeRO-3 partitions weights), "
                             f"got zero_stage {self.zero_stage}: set zero_stage: 3 or offload_params: false")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs zero_stage 1, 2 or 3, got zero_stage 0")
        def is_number(value: Any, kind: type | tuple[type, ...]) -> bool:
            return isinstance(value, kind) and not isinstance(value, bool)

        if not is_number(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise bad("timeout_s", "a positive number of seconds")
        if not is_number(self.zero3_persistence_threshold, int) or self.zero3_persistence_threshold < 0:
            raise bad("zero3_persistence_threshold", "an integer >= 0")


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


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update with 0-based index ``step``.

    Warmup is linear, ``(step + 1) / warmup_steps``, so the first update already moves. After warmup,
    ``constant`` stays at 1 and ``cosine`` follows a half cosine from 1 at ``step = warmup_steps`` to
    ``min_lr_ratio`` at ``step = max_steps`` (and stays there).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_deepspeed_config(cfg: DistributedConfig, *, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                           grad_clip: float, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` and the loop's batch settings (global batch = micro * accum * world).

    ``grad_clip`` <= 0 disables clipping. The optimizer and scheduler are not in the config: the engine hands
    DeepSpeed a torch AdamW and a LambdaLR it builds itself so the schedule is exact.
    """
    if micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError(f"micro_batch_size and grad_accum_steps must be >= 1, got {micro_batch_size} and "
                         f"{grad_accum_steps}")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": max(0.0, float(grad_clip)),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": _FP16_INITIAL_SCALE_POWER},
        # The optimizer is torch's AdamW, which DeepSpeed's own "AdamW" option also builds; it is simply not on
        # the list DeepSpeed checks client optimizers against.
        "zero_allow_untested_optimizer": True,
        # With offloading, let the torch AdamW run on the CPU copies instead of DeepSpeedCPUAdam, which needs a
        # JIT-compiled extension.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": sys.maxsize,
        "wall_clock_breakdown": False,
    }


class _SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` can be made a no-op by setting ``overflow``.

    DeepSpeed reads ``overflow`` from an unwrapped optimizer (ZeRO stage 0, fp32) to skip the scheduler and
    count a skipped step; under ZeRO wrappers the flag is a second guard that the inner update never runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflow = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.overflow:
            return None
        return super().step(closure)


class _SkippableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose next ``step()`` can be skipped, so a discarded window does not advance the schedule."""

    skip_next = False

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.skip_next:
            super().step(*args, **kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) for the buffers that appear in ``module.state_dict()``."""
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


_TENSOR_TAG, _TUPLE_TAG = "__tensor__", "__tuple__"


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str = "client_state") -> Any:
    """JSON form of ``obj``: tensors move into ``tensors`` (written with safetensors), tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        key = f"client.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR_TAG: key}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r}: client_state keys must be strings")
            out[k] = _encode_state(v, tensors, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {_TUPLE_TAG: items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__}: client_state may hold dicts with string keys, lists, "
                    "tuples, numbers, strings, None and tensors")


def _decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode_state`."""
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR_TAG}:
            return tensors[obj[_TENSOR_TAG]]
        if obj.keys() == {_TUPLE_TAG}:
            return tuple(_decode_state(v, tensors) for v in obj[_TUPLE_TAG])
        return {k: _decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    return obj


def _rng_state_json() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"python": [version, list(py_state), py_gauss],
            "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}


def _restore_rng(state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------------
# Failure handling
# ----------------------------------------------------------------------------------------------------------------


def _abort_key() -> str:
    # torchrun keeps its store across restarts: scope the notice to this attempt so a restart is not killed by
    # the previous attempt's notice.
    return f"flowmatch/abort/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _die(rank: int | str, message: str) -> None:
    sys.stderr.write(f"[flowmatch rank {rank}] {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


class _AbortWatch:
    """Background thread that ends this process when another rank reports a failure in the store.

    A rank blocked in a collective cannot notice a dead peer until the collective times out (NCCL) or the
    connection drops (gloo); the store is reachable independently of the collective in flight.
    """

    def __init__(self, store: Any, rank: int) -> None:
        self._store = store
        self._rank = rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowmatch-abort-watch", daemon=True)
        self._thread.start()

    def notice(self) -> str | None:
        """Another rank's failure message, if one has been left."""
        try:
            if self._store.check([_abort_key()]):
                return bytes(self._store.get(_abort_key())).decode(errors="replace")
        except Exception:  # the store is gone: its host rank has died
            return "the rendezvous store is unreachable (its host rank has probably died)"
        return None

    def _run(self) -> None:
        while not self._stop.wait(_ABORT_POLL_S):
            message = self.notice()
            if message is not None and not self._stop.is_set():
                _die(self._rank, f"stopping because {message}")

    def publish(self, message: str) -> None:
        """Leave ``message`` for the other ranks, giving up after a few seconds."""
        self.stop()
        t = threading.Thread(target=lambda: self._store.set(_abort_key(), message), daemon=True)
        t.start()
        t.join(_ABORT_PUBLISH_S)
        if self._rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # Rank 0 hosts the store unless torchrun's agent does: stay until the others have polled the notice,
            # so they report this failure rather than only a vanished store.
            time.sleep(2 * _ABORT_POLL_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2 * _ABORT_POLL_S)


_WATCH: _AbortWatch | None = None


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as this process's main so that a failure on one rank ends all ranks promptly.

    On an exception (or a non-zero ``SystemExit``) the traceback is printed with the rank, a notice is left for
    the other ranks (see :class:`Engine`), and the process exits with status 1 at once, skipping interpreter
    teardown that could block on a half-finished collective. Returns ``fn``'s result otherwise.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        reason, details = f"exited with status {exc.code}", ""
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job, KeyboardInterrupt included
        reason, details = f"{type(exc).__name__}: {exc}", traceback.format_exc()
    rank = os.environ.get("RANK", "0")
    other = _WATCH.notice() if _WATCH is not None else None
    if other is not None:  # this rank failed because another one did first: say so before the local symptom
        sys.stderr.write(f"[flowmatch rank {rank}] stopping because {other}\n")
    sys.stderr.write(f"[flowmatch rank {rank}] failed: {reason}\n{details}")
    sys.stderr.flush()
    if _WATCH is not None and other is None:
        _WATCH.publish(f"rank {rank} failed: {reason}")
    _die(rank, "exiting with status 1")
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------------------------


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


class Engine:
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
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            # A plain `python` process: make it a one-process group so DeepSpeed runs the same code paths.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
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
        self._optimizer: _SkippableAdamW | None = None
        self._scheduler: _SkippableLambdaLR | None = None
        self._named_params: list[tuple[str, torch.nn.Parameter]] = []
        self._own_clip: float | None = None
        self._accum = 1
        self._micro = 0  # backward() calls in the current accumulation window
        self._window_bad = False
        self._skipped_steps = 0
        self._ema: ShadowEma | None = None
        self._ema_backup: list[torch.Tensor] | None = None
        self._closed = False
        global _WATCH
        store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
        if self._world_size > 1 and _WATCH is None and store is not None:
            _WATCH = _AbortWatch(store, self._rank)
            # Interpreter teardown may outlive the store's host; only failures inside the run should stop us.
            atexit.register(_WATCH.stop)

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

    # -- model construction ----------------------------------------------------------------------------------------

    def _zero_init_config(self) -> dict[str, Any]:
        # zero.Init reads only the ZeRO and dtype sections; the batch fields are required by the parser.
        return build_deepspeed_config(self.cfg, micro_batch_size=1, grad_accum_steps=1, world_size=self._world_size,
                                      grad_clip=0.0, on_cuda=self._device.type == "cuda")

    def model_init(self) -> contextlib.AbstractContextManager[Any]:
        """Context to build the trainable model in.

        Under ZeRO-3 this is ``deepspeed.zero.Init``: every module constructed inside is partitioned across ranks
        as soon as its ``__init__`` returns (each rank keeps only its slice, in :attr:`dtype`), so the full model
        never has to fit on one device. Initialisation that runs after construction (``model.init_weights()``)
        must run inside :meth:`gathered_params` with ``modify=True``: on partitioned parameters it silently
        does nothing. Build frozen modules outside this context. DeepSpeed also swaps in its memory-saving
        ``torch.nn.functional.linear`` for the rest of the process (same results). Below ZeRO-3 it does nothing.
        """
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        # No dtype argument: zero.Init then takes it from the config's bf16/fp16 sections (DeepSpeed 0.19 replaces
        # an explicit fp32 by bf16 on accelerators without fp16, such as the CPU).
        return self._ds_lib.zero.Init(config_dict_or_path=self._zero_init_config(),
                                      remote_device="cpu" if self.cfg.offload_params else None,
                                      pin_memory=self.cfg.offload_params and self._device.type == "cuda")

    def gathered_params(self, module_or_params: torch.nn.Module | Iterable[torch.nn.Parameter], *,
                        modify: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Collective context in which ZeRO-3 partitioned parameters are whole on every rank.

        With ``modify=True`` changes made on rank 0 are kept (broadcast and re-partitioned on exit); use it for
        weight initialisation or loading. Below ZeRO-3 parameters are always whole and this does nothing.
        """
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        params = list(module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module)
                      else module_or_params)
        return self._ds_lib.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

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
        optimizer = _SkippableAdamW(list(param_groups_or_params), lr=lr, betas=betas, eps=eps,
                                    weight_decay=weight_decay, **({"fused": True} if fused else {"foreach": True}))
        factor = functools.partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                                   min_lr_ratio=min_lr_ratio)
        made: list[_SkippableLambdaLR] = []

        def make_scheduler(opt: torch.optim.Optimizer) -> _SkippableLambdaLR:
            made.append(_SkippableLambdaLR(opt, factor))
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
        global _WATCH
        if self._closed:
            return
        self._closed = True
        if _WATCH is not None:
            # Stop watching before the barrier: after it the store's host rank may exit at any moment.
            _WATCH.stop()
            _WATCH = None
        if dist.is_initialized():
            dist.barrier()
            if self._owns_group:
                dist.destroy_process_group()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()

    # -- EMA ----------------------------------------------------------------------------------------------------------

    def _working_tensors(self) -> list[torch.Tensor]:
        # Under ZeRO-3 each rank owns the slice p.ds_tensor of every parameter (DeepSpeed keeps it current after
        # each update, also for "persistent" small parameters); below ZeRO-3 the parameter itself is whole.
        if self.cfg.zero_stage == 3:
            return [p.ds_tensor for _, p in self._named_params]
        return [p.detach() for _, p in self._named_params]

    def ema_init(self, decay: float) -> None:
        """Start an fp32 EMA of the weights at their current values (call after :meth:`setup`).

        Under ZeRO-3 each rank averages only its own partition, so updates need no communication. The average
        is taken over the working weights, which are the fp32 masters in fp32 training and their bf16/fp16
        copies otherwise (the accumulator itself is fp32 either way).
        """
        self._require_setup()
        self._ema = ShadowEma(self._working_tensors(), decay)

    def ema_update(self, decay: float | None = None) -> None:
        """Blend the current weights into the EMA (call after each applied update); ``decay`` overrides once."""
        if self._ema is None:
            raise RuntimeError("call Engine.ema_init(decay) before ema_update()")
        self._require_trainable_weights()
        self._ema.update(self._working_tensors(), decay)

    @property
    def ema_enabled(self) -> bool:
        """Whether :meth:`ema_init` was called."""
        return self._ema is not None

    def _full(self, part: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        """Collective under ZeRO-3: the whole tensor from every rank's slice ``part`` of parameter ``p``."""
        if self.cfg.zero_stage != 3:
            return part
        if self._world_size == 1:
            flat = part
        else:
            # On the collective's device: offloaded partitions live in CPU memory, which NCCL cannot send.
            local = part.to(self._device).contiguous()
            parts = [torch.empty_like(local) for _ in range(self._world_size)]
            dist.all_gather(parts, local)
            flat = torch.cat(parts)
        return flat[:p.ds_numel].view(p.ds_shape)

    def _slice(self, full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's ZeRO-3 slice of the whole tensor ``full`` of parameter ``p`` (inverse of :meth:`_full`)."""
        if self.cfg.zero_stage != 3:
            return full
        size = p.ds_tensor.numel()
        flat = torch.nn.functional.pad(full.reshape(-1), (0, size * self._world_size - full.numel()))
        return flat[self._rank * size:(self._rank + 1) * size]

    def _write_whole(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Collective under ZeRO-3: set parameter ``p`` (working copy only) to the whole tensor ``value``."""
        with torch.no_grad(), self.gathered_params([p], modify=True):
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    def ema_swap(self) -> None:
        """Collective: put the EMA weights into the model, or (second call) restore the training weights exactly.

        While swapped, only evaluation is allowed (``backward``/``step``/``save`` raise). Every rank must run the
        same forward calls under ZeRO-3.
        """
        if self._ema is None:
            raise RuntimeError("call Engine.ema_init(decay) before ema_swap()")
        restore = self._ema_backup is not None
        if not restore:
            self._ema_backup = [t.detach().clone() for t in self._working_tensors()]
        sources = self._ema_backup if restore else self._ema.shadow
        assert sources is not None
        for (_, p), src in zip(self._named_params, sources):
            if self.cfg.zero_stage == 3:
                # Writing p.ds_tensor directly would miss copies DeepSpeed keeps whole (persistent or still
                # gathered after an eval forward); GatheredParameters updates every copy consistently.
                self._write_whole(p, self._full(src, p))
            else:
                p.data.copy_(src)
        if restore:
            self._ema_backup = None

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Collective context in which the model holds the EMA weights (see :meth:`ema_swap`)."""
        self.ema_swap()
        try:
            yield
        finally:
            self.ema_swap()

    # -- consolidated weights -----------------------------------------------------------------------------------------

    def _with_buffers(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.is_main:
            for name, buf in _persistent_buffers(self._require_setup().module):
                out[name] = buf.detach().cpu().clone()
        return out

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model as CPU tensors on rank 0 (an empty dict on other ranks).

        Under ZeRO 1-3 parameters come from the fp32 masters, so export is exact even when training in bf16/fp16
        (without ZeRO in bf16/fp16 they are the working copies). Keys are those of ``module.state_dict()``.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        self._require_setup()
        self._require_trainable_weights()
        out: dict[str, torch.Tensor] = {}
        for name, p in self._named_params:
            # The fp32 master (a collective under ZeRO 1-3); None where the parameter is its own master. Frozen
            # parameters have no master.
            full = safe_get_full_fp32_param(p) if self.cfg.zero_stage > 0 and p.requires_grad else None
            if full is None:
                with self.gathered_params([p]):
                    full = p.detach().float().clone()
            if self.is_main:
                out[name] = full.detach().float().cpu().clone()
        return self._with_buffers(out)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole EMA model (fp32, CPU; buffers from the live model) on rank 0, ``{}`` elsewhere."""
        if self._ema is None:
            raise RuntimeError("call Engine.ema_init(decay) before ema_state_dict()")
        out: dict[str, torch.Tensor] = {}
        for (name, p), part in zip(self._named_params, self._ema.shadow):
            full = self._full(part, p)
            if self.is_main:
                out[name] = full.detach().cpu().clone()
        return self._with_buffers(out)

    def _load_whole_weights(self, path: Path) -> None:
        """Collective: set weights and buffers from a consolidated safetensors file, then refresh fp32 masters."""
        module = self._require_setup().module
        with safe_open(str(path), framework="pt") as f:
            expected = {n for n, _ in self._named_params} | {n for n, _ in _persistent_buffers(module)}
            missing, unexpected = expected - set(f.keys()), set(f.keys()) - expected
            if missing or unexpected:
                raise ValueError(f"{path} does not fit this model: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
            with torch.no_grad():
                for name, p in self._named_params:
                    value = f.get_tensor(name)
                    shape = tuple(p.ds_shape) if self.cfg.zero_stage == 3 else tuple(p.shape)
                    if tuple(value.shape) != shape:
                        raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model has {shape}")
                    if self.cfg.zero_stage == 3:
                        self._write_whole(p, value)
                    else:
                        p.data.copy_(value)
                for name, buf in _persistent_buffers(module):
                    buf.copy_(f.get_tensor(name))
        optimizer = self._ds.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()

    # -- training state --------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "world_size": self._world_size, "zero_stage": self.cfg.zero_stage,
                "precision": self.cfg.precision, "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self._skipped_steps, "global_steps": int(self._ds.global_steps),
                "ema_decay": None if self._ema is None else self._ema.decay}

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> None:
        """Collective: write the full training state of every rank into ``directory`` (shared by all ranks).

        Written: DeepSpeed's model, optimizer and scheduler state (subdirectory ``deepspeed/``), and per rank
        ``rank<NNNNN>.json`` (``client_state``, python and numpy RNG) and ``rank<NNNNN>.safetensors`` (torch RNG,
        tensors of ``client_state``, EMA: each rank's partition under ZeRO-3, rank 0 only otherwise), plus
        ``engine.json`` (layout) by rank 0. Nothing is pickled. ``client_state`` is this rank's own (e.g. its data
        position): dicts with string keys, lists, tuples, numbers, strings, None and tensors.
        Call between updates (not inside an accumulation window).
        """
        ds = self._require_setup()
        self._require_trainable_weights()
        if self._micro:
            raise RuntimeError("Engine.save must be called between updates, not inside an accumulation window")
        tensors = {"rng.torch": torch.get_rng_state()}
        payload = json.dumps({"client_state": _encode_state(client_state, tensors), "rng": _rng_state_json()})
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i:03d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self._ema is not None and (self.cfg.zero_stage == 3 or self.is_main):
            tensors.update({f"ema.{name}": t.detach().cpu().contiguous()
                            for (name, _), t in zip(self._named_params, self._ema.shadow)})
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        ds.save_checkpoint(str(out), tag=_DS_TAG, save_latest=False)
        save_file(tensors, str(out / f"rank{self._rank:05d}.safetensors"))
        (out / f"rank{self._rank:05d}.json").write_text(payload)
        if self.is_main:
            (out / "engine.json").write_text(json.dumps(self._layout(), indent=1))
        self.barrier()

    def load(self, directory: str | os.PathLike[str], *, fallback_weights: str | os.PathLike[str] | None = None,
             fallback_ema: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Collective: restore what :meth:`save` wrote (call after :meth:`setup` and :meth:`ema_init`).

        With the same ZeRO stage, world size and precision everything is restored exactly: weights, AdamW state,
        schedule, EMA, RNG states, counters. Otherwise DeepSpeed's sharded optimizer state cannot be re-split
        here, so the weights come from ``fallback_weights`` (consolidated safetensors), the EMA from
        ``fallback_ema``, the schedule position from the layout, AdamW moments restart from zero, and a warning
        says so. Returns this rank's ``client_state`` (rank 0's when this rank did not exist at save time).
        """
        self._require_setup()
        src = Path(directory)
        if not (src / "engine.json").is_file():
            raise FileNotFoundError(f"no engine state in {src} (engine.json missing): expected a directory written by "
                                    f"Engine.save, e.g. RUN_DIR/checkpoints/<step>/state")
        layout = json.loads((src / "engine.json").read_text())
        same = (layout["world_size"], layout["zero_stage"], layout["precision"]) == (
            self._world_size, self.cfg.zero_stage, self.cfg.precision)
        own = self._rank if self._rank < layout["world_size"] else 0
        if same:
            # DeepSpeed reads its files with torch.load(weights_only=False): they hold pickled optimizer state
            # and config objects. Only files this project's runs wrote into the run directory are read here.
            path, _ = self._ds.load_checkpoint(str(src), tag=_DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load its state from {src / _DS_TAG}")
            ema_rank = self._rank if self.cfg.zero_stage == 3 else 0
            self._restore_ema(load_file(str(src / f"rank{ema_rank:05d}.safetensors")), layout)
        else:
            if self.is_main:
                log.warning("checkpoint %s was written by ZeRO-%d, %s, %d process(es); this run is ZeRO-%d, %s, %d "
                            "process(es). DeepSpeed cannot re-shard its optimizer state, so only the weights%s and "
                            "the schedule position are restored: AdamW moments restart from zero",
                            src, layout["zero_stage"], layout["precision"], layout["world_size"],
                            self.cfg.zero_stage, self.cfg.precision, self._world_size,
                            " and EMA" if fallback_ema is not None else "")
            if fallback_weights is None:
                raise ValueError(f"{src} holds a different layout; pass fallback_weights=<model.safetensors>")
            self._load_whole_weights(Path(fallback_weights))
            self._set_schedule_position(int(layout["optimizer_steps"]))
            self._ds.global_steps = int(layout["global_steps"])
            self._restore_ema(None, layout, fallback_ema)
        self._skipped_steps = int(layout["skipped_steps"])
        if own != self._rank:
            log.warning("rank %d did not exist when %s was saved: it keeps its seeded RNG and takes rank 0's "
                        "client_state", self._rank, src)
        saved = json.loads((src / f"rank{own:05d}.json").read_text())
        tensors = load_file(str(src / f"rank{own:05d}.safetensors"))
        if own == self._rank:
            _restore_rng(saved["rng"], tensors)
        return _decode_state(saved["client_state"], tensors)

    def _set_schedule_position(self, steps: int) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        scheduler.last_epoch = steps
        lrs = [base * fn(steps) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def _restore_ema(self, tensors: Mapping[str, torch.Tensor] | None, layout: Mapping[str, Any],
                     fallback: str | os.PathLike[str] | None = None) -> None:
        if self._ema is None:
            return
        names = [n for n, _ in self._named_params]
        if tensors is not None and layout["ema_decay"] is not None:
            self._ema.load([tensors[f"ema.{n}"] for n in names])
        elif fallback is not None and Path(fallback).is_file():
            whole = load_file(str(fallback))
            self._ema.load([self._slice(whole[n], p).float() for n, p in self._named_params])
        else:
            if self.is_main:
                log.warning("the checkpoint has no EMA: the EMA restarts from the loaded weights")
            self._ema.load([t.float() for t in self._working_tensors()])
