"""The recipe section ``distributed`` and the DeepSpeed JSON config built from it.

Nothing in :mod:`flowmatch.engine` imports DeepSpeed before an :class:`~flowmatch.engine.Engine` is created, so
the recipe loader (flowmatch/config.py) stays cheap to import. Precision names are those of :mod:`flowmatch.dtypes`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

from flowmatch.dtypes import DTYPES

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = tuple(DTYPES)
BACKENDS = ("auto", "gloo", "nccl")
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
    rendezvous_timeout_s: float = 300.0
    """Seconds rank 0 waits for every rank to join at start (launchers other than torchrun, whose own rendezvous
    has its timeouts); then it names the missing ranks and the job stops."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's default, 1e5)."""
    memory_budget_gb: Optional[float] = None
    """GiB of accelerator memory per process the run must fit: flowmatch train asks the memory planner
    (flowmatch plan) and sets activation checkpointing, the ZeRO stage, offload and the micro batch so that it does,
    and logs what it chose; null = train as the recipe says."""
    elastic_checkpoints: bool = True
    """Also save the optimizer state as whole tensors by parameter name (12 bytes a parameter), so that the run can
    resume on another number of processes, ZeRO stage or precision without resetting AdamW's moments."""

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

        for field in ("timeout_s", "rendezvous_timeout_s"):
            if not is_number(getattr(self, field), (int, float)) or not getattr(self, field) > 0:
                raise bad(field, "a positive number of seconds")
        if self.memory_budget_gb is not None and not (is_number(self.memory_budget_gb, (int, float))
                                                      and self.memory_budget_gb > 0):
            raise bad("memory_budget_gb", "a positive number of GiB per process, or null")
        if not is_number(self.zero3_persistence_threshold, int) or self.zero3_persistence_threshold < 0:
            raise bad("zero3_persistence_threshold", "an integer >= 0")


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
