"""Whole weights under any ZeRO stage: building the model partitioned, gathering it, exporting and loading it.

Under ZeRO-3 every parameter ``p`` is split into equal flat slices, one per rank (``p.ds_tensor``, the last one
zero-padded), and ``p.ds_shape`` / ``p.ds_numel`` describe the whole tensor; below ZeRO-3 every rank holds
every parameter whole and the helpers here pass tensors through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from flowmatch.engine.config import DistributedConfig, build_deepspeed_config


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) for the buffers that appear in ``module.state_dict()``."""
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


class WeightsMixin:
    """Model construction under ZeRO-3 and consolidated weights: part of :class:`flowmatch.engine.Engine`.

    Uses the engine's attributes declared below and its ``is_main``, ``_require_setup`` and
    ``_require_trainable_weights``.
    """

    cfg: DistributedConfig
    _ds: Any
    _ds_lib: Any
    _rank: int
    _world_size: int
    _device: torch.device
    _named_params: list[tuple[str, torch.nn.Parameter]]

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
