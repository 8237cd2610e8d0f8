"""The :class:`Engine`: a thin facade over the parts of :mod:`flowmatch.engine`, each owning its own state.

=================  ===============================================================================================
part               owns
=================  ===============================================================================================
``ProcessGroup``   rank, world size, device, backend, launcher variables, collectives, shutdown (:mod:`.group`)
``Zero``           the ZeRO layout: partitioned construction, gathering, whole weights in and out (:mod:`.zero`)
``Trainable``      the DeepSpeed-wrapped model, AdamW, LR schedule, forward/backward/step (:mod:`.trainable`)
``Ema``            the fp32 EMA of the weights, its warm-up and profiles, swapping in and out (:mod:`.ema`)
``TrainingState``  save and load of the full training state, ``engine.json`` (:mod:`.state`)
=================  ===============================================================================================

The parts are built here and handed what they need; none reads another's private attributes. The rules that
span parts live here: while the EMA is swapped in, only evaluation is allowed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from flowmatch.dtypes import DTYPES
from flowmatch.engine.config import DistributedConfig
from flowmatch.engine.ema import Ema
from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.optim import OptimConfig
from flowmatch.engine.state import TrainingState
from flowmatch.engine.trainable import StepResult, Trainable
from flowmatch.engine.zero import Zero

T = TypeVar("T")


class Engine:
    """One process's handle on the distributed job and on the DeepSpeed-wrapped trainable model.

    Creating it joins (or, for a plain single process, creates) the process group; :meth:`setup` wraps the
    model; :meth:`shutdown` (or leaving a ``with Engine(...)`` block normally) tears the group down.
    All methods documented as collective must be called by every rank in the same order.
    """

    def __init__(self, cfg: DistributedConfig) -> None:
        self.cfg = cfg
        self._group = ProcessGroup(cfg)
        self._zero = Zero(cfg, self._group)
        self._trainable: Trainable | None = None
        self._ema: Ema | None = None

    # -- process facts and collectives ---------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Global rank of this process, 0 .. world_size - 1."""
        return self._group.rank

    @property
    def world_size(self) -> int:
        """Number of processes in the job."""
        return self._group.world_size

    @property
    def local_rank(self) -> int:
        """Rank of this process on its node (selects the GPU)."""
        return self._group.local_rank

    @property
    def device(self) -> torch.device:
        """Device that holds this rank's model and batches (``cuda:<local_rank>`` with NCCL, else CPU)."""
        return self._group.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, which writes files and logs."""
        return self._group.is_main

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the working weights as configured (``distributed.precision``): cast floating inputs of
        :meth:`forward` to it. :attr:`working_dtype` is the one observed in the model."""
        return DTYPES[self.cfg.precision]

    def barrier(self) -> None:
        """Collective: wait until every rank gets here."""
        self._group.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise sum of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self._group.all_reduce_sum(t)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: a new tensor holding the elementwise mean of ``t`` over ranks (``t`` on :attr:`device`)."""
        return self._group.all_reduce_mean(t)

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Collective: rank ``src``'s ``obj`` on every rank (picklable; only ever exchanged between our ranks)."""
        return self._group.broadcast_object(obj, src)

    def all_gather_object(self, obj: T) -> list[T]:
        """Collective: every rank's ``obj`` (picklable), indexed by rank, on every rank."""
        return self._group.all_gather_object(obj)

    # -- building the model ----------------------------------------------------------------------------------------

    def model_init(self) -> contextlib.AbstractContextManager[Any]:
        """Context to build the trainable model in.

        Under ZeRO-3 this is ``deepspeed.zero.Init``: every module constructed inside is partitioned across ranks
        as soon as its ``__init__`` returns (each rank keeps only its slice, in :attr:`dtype`), so the full model
        never has to fit on one device. Initialisation that runs after construction (``model.init_weights()``)
        must run inside :meth:`gathered_params` with ``modify=True``: on partitioned parameters it silently
        does nothing. Build frozen modules outside this context. DeepSpeed also swaps in its memory-saving
        ``torch.nn.functional.linear`` for the rest of the process (same results). Below ZeRO-3 it does nothing.
        """
        return self._zero.model_init()

    def gathered_params(self, module_or_params: torch.nn.Module | Iterable[torch.nn.Parameter], *,
                        modify: bool = False) -> contextlib.AbstractContextManager[Any]:
        """Collective context in which ZeRO-3 partitioned parameters are whole on every rank.

        With ``modify=True`` changes made on rank 0 are kept (broadcast and re-partitioned on exit); use it for
        weight initialisation or loading. Below ZeRO-3 parameters are always whole and this does nothing.
        """
        return self._zero.gathered_params(module_or_params, modify=modify)

    def assign_weights(self, module: torch.nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
        """Collective under ZeRO-3: give the model built in :meth:`model_init` these whole weights (its
        ``state_dict()`` names and shapes), before :meth:`setup`. Below ZeRO-3 they are assigned without a copy,
        so a model built on the meta device takes them as they are; under ZeRO-3 each parameter is written
        from rank 0's tensor into its partitions, one at a time (the whole model is never gathered), and the
        other ranks may pass None rather than read the weights too."""
        self._zero.assign(module, state)

    def setup(self, model: torch.nn.Module, params: Iterable[Any], optim: OptimConfig, *, max_steps: int,
              micro_batch_size: int, grad_accum_steps: int) -> None:
        """Collective: wrap ``model`` with DeepSpeed, AdamW and the learning-rate schedule.

        Args:
            model: the trainable module (built inside :meth:`model_init` for ZeRO-3), on any device.
            params: parameters, or AdamW param-group dicts (e.g. no weight decay for norms).
            optim: the recipe's ``optim`` section: AdamW, the schedule, gradient clipping.
            max_steps: updates the schedule runs over (see :func:`~flowmatch.engine.lr_factor`).
            micro_batch_size: samples per rank per forward; the global batch is
                ``micro_batch_size * grad_accum_steps * world_size``.
            grad_accum_steps: micro-batches per optimizer update.
        """
        if self._trainable is not None:
            raise RuntimeError("Engine.setup was already called; create one Engine per model")
        self._trainable = Trainable(self.cfg, self._group, model, params, optim, max_steps=max_steps,
                                    micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps)

    def _require_setup(self) -> Trainable:
        if self._trainable is None:
            raise RuntimeError("call Engine.setup(model, ...) first")
        return self._trainable

    def _require_training_weights(self) -> Trainable:
        trainable = self._require_setup()
        if self._ema is not None and self._ema.swapped:
            raise RuntimeError("EMA weights are swapped in: call ema.swap() again (or leave ema.weights()) first")
        return trainable

    # -- training step -----------------------------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (partitioned under ZeRO-3: see :meth:`gathered_params`)."""
        return self._require_setup().module

    @property
    def working_dtype(self) -> torch.dtype:
        """Dtype of the working weights as observed in the wrapped model (what the forward really computes in);
        equals :attr:`dtype` unless DeepSpeed did not apply the configured precision."""
        return self._require_setup().working_dtype

    def train(self) -> None:
        """Put the model in training mode."""
        self._require_setup().train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self._require_setup().eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model through DeepSpeed (which gathers ZeRO-3 partitions as needed); all ranks must call it.

        Arguments go to the model unchanged; cast floating inputs to :attr:`dtype` (DeepSpeed does not autocast).
        """
        return self._require_setup().forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Collective: backpropagate one micro-batch's scalar ``loss``.

        Call it ``grad_accum_steps`` times (one per micro-batch), then :meth:`step` once. Gradients are averaged
        over micro-batches and ranks. Whether ``loss`` is finite is noted on the device, without a host sync; a
        non-finite loss on any rank makes the next :meth:`step` discard the whole window on every rank.
        """
        self._require_training_weights().backward(loss)

    def step(self) -> StepResult:
        """Collective: apply the update of the window of micro-batches passed to :meth:`backward`, or discard it.

        The ranks agree here whether every loss of the window was finite: one tiny all-reduce and one host
        read-back per update, where DeepSpeed's update synchronises with the host anyway (the gradient norm of
        the result is read after it). A discarded window (``result.skipped``) leaves weights, AdamW moments and the
        LR schedule as they were and counts in :attr:`skipped_steps`. The LR schedule advances only with applied
        updates.
        """
        return self._require_training_weights().step()

    @property
    def lr(self) -> float:
        """Learning rate the next update uses (of the first param group)."""
        return self._require_setup().lr

    @property
    def optimizer_steps(self) -> int:
        """Updates applied so far (restored by :meth:`load`)."""
        return self._require_setup().optimizer_steps

    @property
    def skipped_steps(self) -> int:
        """Accumulation windows discarded for a non-finite loss so far (restored by :meth:`load`); 0 before setup."""
        return 0 if self._trainable is None else self._trainable.skipped_steps

    # -- EMA -----------------------------------------------------------------------------------------------------------

    def init_ema(self, decay: float, *, warmup: float = 0.0, profiles: Sequence[float] = ()) -> Ema:
        """Start an fp32 EMA of the weights at their current values (call after :meth:`setup`); returns
        :attr:`ema`, which the training loop, validation, checkpoints and post-hoc EMA then use directly.

        Args:
            decay: the cap of each update's decay (the decay of every update without warm-up).
            warmup: relative width sigma_rel of the power-function warm-up (:mod:`.ema`); 0 = none.
            profiles: sigma_rel of power-function EMAs to track beside it, for post-hoc EMA.

        Under ZeRO-3 each rank averages only its own partition, so updates need no communication. The average
        is taken over the working weights, which are the fp32 masters in fp32 training and their bf16/fp16
        copies otherwise (the accumulator itself is fp32 either way). While its weights are swapped in
        (:meth:`Ema.swap`, :meth:`Ema.weights`), only evaluation is allowed (``backward``/``step``/``save`` raise).
        """
        trainable = self._require_setup()
        self._ema = Ema(trainable.module, trainable.named_params, self._zero, decay, warmup=warmup,
                        profiles=profiles)
        return self._ema

    @property
    def ema(self) -> Ema | None:
        """The EMA of the weights (:class:`~flowmatch.engine.ema.Ema`), or None before :meth:`init_ema`."""
        return self._ema

    # -- whole weights and the training state ----------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole trainable model as CPU tensors on rank 0 (an empty dict on other ranks).

        Under ZeRO 1-3 parameters come from the fp32 masters, so export is exact even when training in bf16/fp16
        (without ZeRO in bf16/fp16 they are the working copies, widened to fp32). Keys are those of
        ``module.state_dict()``, less the frozen parameters (a LoRA's base weights): a model that trains all its
        parameters is there whole, a LoRA run's holds its adapters (and buffers).
        """
        trainable = self._require_training_weights()
        whole = ((name, self._zero.master(p)) for name, p in trainable.named_params)
        return self._zero.consolidate(trainable.module, whole)

    def _state(self) -> TrainingState:
        return TrainingState(self.cfg, self._group, self._zero, self._require_training_weights(), self._ema)

    def save(self, directory: str | os.PathLike[str], client_state: Mapping[str, Any]) -> list[Path]:
        """Collective: write the full training state of every rank into ``directory`` (shared by all ranks).

        Also written, by every rank its share: the optimizer state as whole tensors by parameter name
        (``optim-full*``, :mod:`flowmatch.engine.elastic`), which any other layout resumes from.
        Written per rank: ``rank<NNNNN>.json`` (``client_state``, python and numpy RNG, the optimizer's step counts,
        param groups, LR schedule and loss scale) and ``rank<NNNNN>.safetensors`` (torch RNG, tensors of
        ``client_state``, the AdamW moments of the rank's ZeRO partition and, in bf16/fp16, its fp32 masters; its
        EMA partition under ZeRO-3; without ZeRO rank 0 alone writes the optimizer state), plus ``engine.json``
        (:class:`~flowmatch.engine.EngineMeta`: layout and counters) by rank 0. Nothing is pickled. The working
        weights and (below ZeRO-3) the EMA are not included: save :meth:`model_state_dict` and
        :meth:`Ema.state_dict` beside it and pass them to :meth:`load`. ``client_state`` is this rank's own
        (e.g. its data position): dicts with string keys, lists, tuples, numbers, strings, None and tensors. Call
        between updates (not inside an accumulation window). Returns the files this rank wrote.
        """
        return self._state().save(directory, client_state)

    def load(self, directory: str | os.PathLike[str], *, weights: str | os.PathLike[str],
             ema: str | os.PathLike[str] | None = None, elastic: bool = True) -> dict[str, Any]:
        """Collective: restore what :meth:`save` wrote (call after :meth:`setup` and :meth:`init_ema`).

        ``weights`` is the consolidated safetensors file of :meth:`model_state_dict` saved with the state; ``ema``
        the one of :meth:`Ema.state_dict`, if any. With the same ZeRO stage, world size and precision everything
        is restored exactly from the per-rank files: weights, fp32 masters, AdamW state, schedule, EMA, RNG
        states, counters. On another layout the weights and EMA come from ``weights`` and ``ema``, and each rank
        takes its pieces of the fp32 masters and AdamW moments from their whole tensors
        (:mod:`flowmatch.engine.elastic`; not with ``elastic=False``, for a checkpoint whose copy of them is
        known to be damaged); when those are missing or damaged the moments restart from zero, with a warning
        naming what was reset. Nothing is unpickled. Returns this rank's ``client_state`` (rank 0's when this
        rank did not exist at save time).
        """
        return self._state().load(directory, weights=weights, ema=ema, elastic=elastic)

    # -- leaving -----------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Collective: wait for all ranks, then leave the process group. Safe to call twice."""
        self._zero.release()
        self._group.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self._zero.release()
            self._group.restore_env()
