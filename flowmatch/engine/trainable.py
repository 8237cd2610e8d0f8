"""The trainable model wrapped by DeepSpeed with AdamW and the learning-rate schedule: forward, backward, step.

A non-finite loss anywhere in an accumulation window discards the whole window on every rank (see
:mod:`.nonfinite`); ``step()`` says what happened in a :class:`StepResult`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flowmatch.engine.config import DistributedConfig, build_deepspeed_config
from flowmatch.engine.group import ProcessGroup
from flowmatch.engine.nonfinite import FiniteWindow
from flowmatch.engine.optim import OptimConfig, SkippableLambdaLR, adamw_implementation, lr_factor
from flowmatch.engine.optimizers import FusedBackward, build_optimizer
from flowmatch.errors import RecipeError

# Prefix of the optimizer state among a rank's saved tensors.
_OPTIM_KEY = "optim."
# Joins the keys of a nested optimizer state (bitsandbytes keeps its 8-bit blocks in a dict per parameter).
_NESTED = "/"
# Attributes of DeepSpeed's optimizer wrappers that hold the fp16 loss scale (ZeRO's, and the one without ZeRO).
_LOSS_SCALE_HOLDERS = ("loss_scaler", "loss_scale_config")
# AdamW hyper-parameters of a param group, set from the recipe: a resumed run keeps its own, not the saved ones.
_HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def _split_state(state: Mapping[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """One parameter's optimizer state without its tensors, which go into ``tensors`` under ``prefix`` + their key
    (nested dicts, as bitsandbytes' quantisation state, by keys joined with :data:`_NESTED`)."""
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        elif isinstance(value, Mapping):
            plain[key] = _split_state(value, tensors, f"{prefix}{key}{_NESTED}")
        else:
            plain[key] = value
    return plain


@dataclass
class StepResult:
    """What :meth:`flowmatch.engine.Engine.step` did.

    Attributes:
        stepped: the optimizer applied an update (every loss of the window was finite on every rank).
        skipped: the window contained a non-finite loss and was discarded: nothing changed.
        grad_norm: global L2 norm of the gradients before clipping, when ``stepped``; else None. A number or a
            0-dim tensor on the device: reading it is a host sync, so the loop does that at log steps only.
    """

    stepped: bool
    skipped: bool
    grad_norm: float | torch.Tensor | None


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
        if optim.name == "adafactor" and cfg.zero_stage > 0:
            raise RecipeError(f"optim.name: adafactor with distributed.zero_stage: {cfg.zero_stage}: ZeRO hands the "
                              "optimizer flat partitions, on which Adafactor cannot factor its second moment by rows "
                              "and columns; use zero_stage: 0, or optim.name: adamw8bit to save optimizer memory")
        if optim.fused_backward and (cfg.zero_stage > 0 or group.world_size > 1 or cfg.precision != "fp32"):
            raise RecipeError(f"optim.fused_backward: true needs distributed.zero_stage: 0 and precision: fp32 on one "
                              f"process (got zero_stage {cfg.zero_stage}, {cfg.precision}, {group.world_size} "
                              "process(es)): ZeRO and data parallelism reduce the gradients after backward, when the "
                              "update inside backward has already run, and bf16/fp16 update fp32 master copies the "
                              "backward hooks never see; set fused_backward: false")
        make = functools.partial(build_optimizer, optim.name, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay,
                                 implementation=adamw_implementation(group.device, offload=cfg.offload_optimizer))
        optimizer = FusedBackward(params, make) if optim.fused_backward else make(params)
        self.optimizer_name = optim.name
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
        self._fused = optimizer if isinstance(optimizer, FusedBackward) else None
        if self._fused is not None:
            # One process without ZeRO: there is nothing to reduce, and the gradients are gone by then anyway
            # (DeepSpeed would allocate zeros for them).
            self._ds.enable_backward_allreduce = False
        self._zero_stage = cfg.zero_stage
        self._accum = grad_accum_steps
        self._micro = 0  # backward() calls in the current accumulation window
        self._window = FiniteWindow(group)
        self._skipped_steps = 0
        self._fused_skip = False
        # Frozen parameters (a LoRA's base weights) stay in the model, partitioned under ZeRO-3 like the others, but
        # have no optimizer state, no EMA and no place in the checkpoint's weights.
        self._named_params = [(n, p) for n, p in self._ds.module.named_parameters() if p.requires_grad]

    @property
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters of the wrapped model, in a fixed order (partitioned under ZeRO-3)."""
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
        loss = self._window.record(loss)
        if self._fused is not None and self._micro + 1 == self._accum:
            # The updates run inside this backward: the window's verdict is read first (the read-back step()
            # makes otherwise), and a discarded window's last backward leaves the parameters alone.
            self._fused_skip = not self._window.agree()
            self._fused.armed = not self._fused_skip
        try:
            self._ds.backward(loss)
        finally:
            if self._fused is not None:
                self._fused.armed = False
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
        # The step's one read-back of the window's verdict (with fused backward, read before the last backward).
        skip = self._fused_skip if self._fused is not None else not self._window.agree()
        norm: Any = None
        if self._own_clip is not None and not skip and self._fused is None:
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
        if norm is None and self._fused is None:  # with fused backward no global norm exists
            norm = self._ds.get_global_grad_norm()
        return StepResult(stepped=True, skipped=False, grad_norm=norm)

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

    def restore_counts(self, *, skipped_steps: int, global_steps: int, optimizer_steps: int | None = None) -> None:
        """Set the counters of a resumed run; ``optimizer_steps`` also moves the schedule to that position (when
        the saved schedule state could not be loaded)."""
        self._skipped_steps = skipped_steps
        if optimizer_steps is not None:
            self._scheduler.set_position(optimizer_steps)
        self._ds.global_steps = global_steps
        # DeepSpeed's own default for a checkpoint that does not record it; only its monitors read it.
        self._ds.global_samples = global_steps * self._ds.train_batch_size()

    def refresh_masters(self) -> None:
        """Copy the working weights into the fp32 masters (after writing the working weights directly)."""
        optimizer = self._ds.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()

    @property
    def partitions_optimizer(self) -> bool:
        """Whether each rank holds only its own slice of the optimizer state (ZeRO 1-3); without ZeRO every rank
        holds the same whole state."""
        return self._zero_stage >= 1

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW (under ZeRO-3 its param groups are empty outside a step: see
        :meth:`optimizer_with_masters`)."""
        return self._optimizer

    @property
    def deepspeed_optimizer(self) -> Any:
        """DeepSpeed's optimizer wrapper (ZeRO's, the bf16/fp16 one), or the torch AdamW itself where it has none."""
        return self._ds.optimizer

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the model was wrapped with."""
        return self._zero_stage

    @contextlib.contextmanager
    def optimizer_with_masters(self) -> Iterator[torch.optim.Optimizer]:
        """The torch AdamW with this rank's fp32 masters in its param groups, as torch's state_dict expects.

        Below ZeRO-3 DeepSpeed leaves them there: the model's own parameters without a wrapper, the bf16/fp16
        wrapper's fp32 copies, or this rank's flat fp32 partition under ZeRO 1-2. ZeRO-3 hands its flat partitions
        to the optimizer only for the length of its step, so they are attached here meanwhile, in the order
        DeepSpeed's own checkpointing attaches them.
        """
        zero3 = self._ds.optimizer
        flats = getattr(zero3, "fp32_partitioned_groups_flat", None)
        if flats is None:
            yield self._optimizer
            return
        groups = self._optimizer.param_groups
        for sub_group, flat in enumerate(flats):
            groups[zero3.sub_group_to_group_id[sub_group]]["params"].append(flat)
        try:
            yield self._optimizer
        finally:
            # The optimizer's current groups: load_state_dict replaces the group dicts, and the flats left in new
            # ones would be attached twice on the next call.
            for group in self._optimizer.param_groups:
                group["params"] = []

    def _loss_scalers(self) -> dict[str, Any]:
        """The objects holding the fp16 loss scale of DeepSpeed's wrapper (names as on the wrapper)."""
        wrapper = self._ds.optimizer
        return {name: getattr(wrapper, name) for name in _LOSS_SCALE_HOLDERS
                if wrapper is not self._optimizer and getattr(wrapper, name, None) is not None}

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's optimizer state as (tensors, JSON-serialisable dict), nothing pickled.

        Tensors (CPU): AdamW's per-tensor state (moments, step) of this rank's partition, and the fp32 masters it
        updates when they differ from the working weights (bf16/fp16). In fp32 the masters equal the working
        weights bit for bit (DeepSpeed copies one into the other after each update), which travel with the
        checkpoint anyway, so they are not written twice.

        The dict: AdamW's param groups (hyper-parameters, current lr), the LR schedule's state and the fp16 loss
        scale. :meth:`load_optimizer_state` restores them into a run of the same layout.
        """
        tensors: dict[str, torch.Tensor] = {}
        with self.optimizer_with_masters() as opt:
            saved = opt.state_dict()
            masters = [p for group in opt.param_groups for p in group["params"]]
        if self.working_dtype != torch.float32:
            tensors.update({f"{_OPTIM_KEY}master.{i}": p.detach().cpu().contiguous() for i, p in enumerate(masters)})
        plain: dict[str, dict[str, Any]] = {}
        for index, state in saved["state"].items():
            plain[str(index)] = _split_state(state, tensors, f"{_OPTIM_KEY}state.{index}.")
        info = {"masters": len(masters), "param_groups": saved["param_groups"], "state": plain,
                **self.schedule_state()}
        return tensors, info

    def schedule_state(self) -> dict[str, Any]:
        """What of the optimizer does not depend on the layout, as JSON: the LR schedule and the fp16 loss scale."""
        scalers = {name: {k: v for k, v in vars(obj).items() if v is None or isinstance(v, (bool, int, float))}
                   for name, obj in self._loss_scalers().items()}
        return {"schedule": self._scheduler.state_dict(), "loss_scale": scalers}

    def load_schedule_state(self, info: Mapping[str, Any]) -> None:
        """Restore what :meth:`schedule_state` returned."""
        self._scheduler.load_state_dict(dict(info["schedule"]))
        # The saved schedule holds the old peak lr: continue at the saved position with this run's peak.
        self._scheduler.base_lrs = [group["initial_lr"] for group in self._optimizer.param_groups]
        self._scheduler.set_position(self._scheduler.last_epoch)
        for name, obj in self._loss_scalers().items():
            for key, value in info["loss_scale"].get(name, {}).items():
                setattr(obj, key, value)

    @staticmethod
    def load_into(opt: torch.optim.Optimizer, state: Mapping[int, Mapping[str, Any]],
                  saved_groups: list[Mapping[str, Any]]) -> None:
        """``opt.load_state_dict`` with ``state`` and ``saved_groups`` (read back from JSON), where the
        hyper-parameters are this run's (a resumed recipe may change them) and each group's parameter indices are
        this optimizer's own (this layout's)."""
        here = opt.state_dict()["param_groups"]
        if len(saved_groups) != len(here):
            raise ValueError(f"the saved optimizer has {len(saved_groups)} param group(s), this one {len(here)}: it "
                             "was written by another model or parameter grouping")
        groups = [{**saved, **{k: live[k] for k in _HYPER if k in live}, "params": mine["params"]}
                  for saved, live, mine in zip(saved_groups, opt.param_groups, here)]
        opt.load_state_dict({"state": dict(state), "param_groups": groups})

    def load_optimizer_state(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` returned on the same rank of a run of the same layout (ZeRO stage,
        world size, precision). Call after restoring the working weights (from the consolidated weights): in fp32
        the masters are copied from them."""
        state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in info["state"].items()}
        prefix = f"{_OPTIM_KEY}state."
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, name = key[len(prefix):].split(".", 1)
                *outer, last = name.split(_NESTED)
                inner = state[int(index)]
                for part in outer:
                    inner = inner.setdefault(part, {})
                inner[last] = value
        has_masters = any(key.startswith(f"{_OPTIM_KEY}master.") for key in tensors)
        if not has_masters:  # fp32: the masters equal the working weights, restored already
            self.refresh_masters()
        with self.optimizer_with_masters() as opt:
            masters = [p for group in opt.param_groups for p in group["params"]]
            if len(masters) != info["masters"]:
                raise ValueError(f"the saved optimizer state has {info['masters']} master tensor(s), this rank has "
                                 f"{len(masters)}: it was written by another model or layout")
            with torch.no_grad():
                for i, p in enumerate(masters if has_masters else []):
                    saved = tensors[f"{_OPTIM_KEY}master.{i}"]
                    if saved.shape != p.shape:
                        raise ValueError(f"saved master {i} has shape {tuple(saved.shape)}, this rank's has "
                                         f"{tuple(p.shape)}: it was written by another model or layout")
                    p.copy_(saved)
            self.load_into(opt, state, info["param_groups"])
        self.load_schedule_state(info)
