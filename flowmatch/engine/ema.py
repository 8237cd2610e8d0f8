"""The engine's fp32 EMA of the trainable weights, under any ZeRO stage.

The arithmetic is :class:`flowmatch.ema.ShadowEma`; this module decides what it averages (each rank's own
ZeRO-3 partition, else the whole parameters), swaps the average into the model for evaluation and gathers it for
export and checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flowmatch.ema import ShadowEma
from flowmatch.engine.config import DistributedConfig

log = logging.getLogger(__name__)


class EmaMixin:
    """EMA of the weights: part of :class:`flowmatch.engine.Engine`.

    Uses the engine's attributes declared below, its ``is_main``, ``_require_setup`` and
    ``_require_trainable_weights``, and the ZeRO-3 helpers of :class:`WeightsMixin`.
    """

    cfg: DistributedConfig
    _named_params: list[tuple[str, torch.nn.Parameter]]
    _ema: ShadowEma | None
    _ema_backup: list[torch.Tensor] | None

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
