"""What a non-finite loss does: the engine discards the whole accumulation window on every rank.

Finiteness is recorded on the device as each micro-batch's loss goes through backward, without a host sync.
The ranks agree, and the host reads the verdict back, once per optimizer step, inside the engine's ``step()``,
where DeepSpeed's update synchronises with the host anyway. A discarded window leaves the weights, AdamW moments
and learning-rate schedule as they were; the loop only learns from the step's result that it happened.
"""

from __future__ import annotations

import torch

from flowmatch.engine.group import ProcessGroup


class FiniteWindow:
    """Whether every loss of the current accumulation window, on every rank, was finite.

    Args:
        group: the ranks that must agree.
    """

    def __init__(self, group: ProcessGroup) -> None:
        self._group = group
        self._finite: torch.Tensor | None = None  # bool scalar on the losses' device; None before the first loss

    def record(self, loss: torch.Tensor) -> torch.Tensor:
        """Note whether ``loss`` is finite (on its device) and return the loss to backpropagate.

        The returned loss is ``loss`` when it is finite and NaN otherwise, so that every gradient of a bad
        window is NaN: backward must still run (DeepSpeed's ZeRO optimizers fail on a window without one), and
        NaN gradients can never be mistaken for a usable update.
        """
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def agree(self) -> bool:
        """Collective: True when every loss recorded on every rank since the last call was finite; then reset.

        One all-reduce and one host read-back.
        """
        if self._finite is None:
            raise RuntimeError("no loss was recorded in this window")
        flag = self._finite.to(device=self._group.device, dtype=torch.float32).reshape(1)
        self._finite = None
        return self._group.all_reduce_min(flag).item() > 0
