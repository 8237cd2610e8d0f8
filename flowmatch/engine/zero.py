"""Whole weights under any ZeRO stage: building the model partitioned, gathering it, exporting and loading it.

Under ZeRO-3 every parameter ``p`` is split into equal flat slices, one per rank (``p.ds_tensor``, the last one
zero-padded), and ``p.ds_shape`` / ``p.ds_numel`` describe the whole tensor; below ZeRO-3 every rank holds
every parameter whole and the helpers here pass tensors through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from flowmatch.engine.config import DistributedConfig, build_deepspeed_config
from flowmatch.engine.group import ProcessGroup


def persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) for the buffers that appear in ``module.state_dict()``."""
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


class Zero:
    """The ZeRO layout of the trainable weights on this rank, and whole tensors from and into it.

    Args:
        cfg: the ``distributed`` settings (ZeRO stage, offloading, precision).
        group: the process group the partitions are spread over.
    """

    def __init__(self, cfg: DistributedConfig, group: ProcessGroup) -> None:
        self._cfg = cfg
        self._group = group

    @property
    def partitioned(self) -> bool:
        """Whether each rank holds only a slice of every parameter (ZeRO-3)."""
        return self._cfg.zero_stage == 3

    def model_init(self) -> contextlib.AbstractContextManager[Any]:
        """Context to build the trainable model in (see :meth:`flowmatch.engine.Engine.model_init`)."""
        if not self.partitioned:
            return contextlib.nullcontext()
        # zero.Init reads only the ZeRO and dtype sections; the batch fields are required by the parser. No dtype
        # argument: zero.Init then takes it from the config's bf16/fp16 sections (DeepSpeed 0.19 replaces an
        # explicit fp32 by bf16 on accelerators without fp16, such as the CPU).
        on_cuda = self._group.device.type == "cuda"
        config = build_deepspeed_config(self._cfg, micro_batch_size=1, grad_accum_steps=1,
                                        world_size=self._group.world_size, grad_clip=0.0, on_cuda=on_cuda)
        return self._group.deepspeed.zero.Init(config_dict_or_path=config,
                                               remote_device="cpu" if self._cfg.offload_params else None,
                                               pin_memory=self._cfg.offload_params and on_cuda)

    def release(self) -> None:
        """Put torch's own ``F.linear`` back once this layout's training is over. ``zero.Init`` replaces
        ``torch.nn.functional.linear`` for the whole process with its memory-efficient autograd.Function (kept by
        DeepSpeed "unless manually reset"), which has no forward-mode rule: a JVP later in the process (MeanFlow,
        the planner's trace) would fail. A later ``zero.Init`` installs it again."""
        if not self.partitioned:
            return
        init = self._group.deepspeed.runtime.zero.partition_parameters.InsertPostInitMethodToModuleSubClasses
        original = getattr(init, "linear_bk", None)  # set by zero.Init when it replaced F.linear
        if original is not None:
            torch.nn.functional.linear = original

    def gathered_params(self, module_or_params: torch.nn.Module | Iterable[torch.nn.Parameter], *,
                        modify: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Collective context in which partitioned parameters are whole on every rank (rank 0's edits kept with
        ``modify=True``); does nothing below ZeRO-3."""
        if not self.partitioned:
            return contextlib.nullcontext()
        params = list(module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module)
                      else module_or_params)
        return self._group.deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def local(self, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's working values of ``p``: its slice under ZeRO-3, else the whole parameter (no copy)."""
        # DeepSpeed keeps p.ds_tensor current after each update, also for "persistent" small parameters.
        return p.ds_tensor if self.partitioned else p.detach()

    def shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        """The whole shape of parameter ``p``."""
        return tuple(p.ds_shape) if self.partitioned else tuple(p.shape)

    def full(self, part: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        """Collective under ZeRO-3: the whole tensor from every rank's slice ``part`` of parameter ``p``."""
        if not self.partitioned:
            return part
        return self._group.all_gather_flat(part)[:p.ds_numel].view(p.ds_shape)

    def slice(self, full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of the whole tensor ``full`` of parameter ``p`` (inverse of :meth:`full`)."""
        if not self.partitioned:
            return full
        size, rank = p.ds_tensor.numel(), self._group.rank
        flat = torch.nn.functional.pad(full.reshape(-1), (0, size * self._group.world_size - full.numel()))
        return flat[rank * size:(rank + 1) * size]

    @torch.no_grad()
    def write(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Collective under ZeRO-3: set the working copy of ``p`` to the whole tensor ``value`` (not the masters)."""
        # Under ZeRO-3, writing p.ds_tensor alone would miss copies DeepSpeed keeps whole (persistent parameters,
        # or ones still gathered after an eval forward); GatheredParameters updates every copy consistently.
        with self.gathered_params([p], modify=True):
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    def master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """Collective under ZeRO: the whole fp32 master of ``p``, or its whole working copy where it has none."""
        from deepspeed.utils import safe_get_full_fp32_param

        # None where DeepSpeed links no master to the parameter: frozen parameters, and all of them without ZeRO
        # (in fp32 each parameter is its own master; the bf16/fp16 wrapper keeps its masters to itself).
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with self.gathered_params([p]):
                full = p.detach().float().clone()
        return full

    def consolidate(self, module: torch.nn.Module,
                    whole: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collective: a state dict on rank 0 (``{}`` elsewhere) of fp32 CPU tensors and ``module``'s buffers.

        ``whole`` yields (name, whole tensor) pairs and may gather lazily: every rank must iterate it.
        """
        out: dict[str, torch.Tensor] = {}
        for name, tensor in whole:
            if self._group.is_main:
                out[name] = tensor.detach().float().cpu().clone()
        if self._group.is_main:
            for name, buf in persistent_buffers(module):
                out[name] = buf.detach().cpu().clone()
        return out

    def assign(self, module: torch.nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
        """Collective under ZeRO-3: set every parameter and buffer of ``module`` (before setup) from whole tensors.

        ``state`` must hold exactly ``module.state_dict()``'s names and shapes. Below ZeRO-3 the tensors are
        assigned as they are (a module built on the meta device takes them without a copy); under ZeRO-3 each
        parameter is gathered, written from rank 0's tensor and partitioned again, one at a time, so ranks other
        than 0 may pass None instead of holding a copy of the whole model.
        """
        if state is None and not (self.partitioned and not self._group.is_main):
            raise ValueError("whole weights are needed here: only ranks other than 0 under ZeRO-3 may pass None")
        if state is not None:
            expected = {n for n, _ in module.named_parameters()} | {n for n, _ in persistent_buffers(module)}
            missing, unexpected = expected - set(state), set(state) - expected
            if missing or unexpected:
                raise ValueError(f"the weights do not fit this model: missing {sorted(missing)[:5]}, unexpected "
                                 f"{sorted(unexpected)[:5]}")
        if not self.partitioned:
            module.load_state_dict(state, strict=True, assign=True)
            return
        for name, p in module.named_parameters():
            value = state[name] if state is not None else torch.empty(self.shape(p), dtype=p.dtype)
            if tuple(value.shape) != self.shape(p):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, the model has {self.shape(p)}")
            self.write(p, value)  # rank 0's value is the one kept
        buffers = list(persistent_buffers(module))
        if buffers and state is None:  # buffers are not partitioned: every rank needs their values
            raise ValueError(f"this model has buffers ({buffers[0][0]}, ...): every rank must pass the weights")
        with torch.no_grad():
            for name, buf in buffers:
                buf.copy_(state[name])

    def load_whole(self, module: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], path: Path) -> None:
        """Collective: set the working values of the parameters ``named`` (the trainable ones) and the buffers of
        ``module`` from a consolidated safetensors file.

        The fp32 masters are not touched: the caller refreshes them from the working weights.
        """
        with safe_open(str(path), framework="pt") as f:
            expected = {n for n, _ in named} | {n for n, _ in persistent_buffers(module)}
            missing, unexpected = expected - set(f.keys()), set(f.keys()) - expected
            if missing or unexpected:
                raise ValueError(f"{path} does not fit this model: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
            for name, p in named:
                value = f.get_tensor(name)
                if tuple(value.shape) != self.shape(p):
                    raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model has {self.shape(p)}")
                self.write(p, value)
            with torch.no_grad():
                for name, buf in persistent_buffers(module):
                    buf.copy_(f.get_tensor(name))
