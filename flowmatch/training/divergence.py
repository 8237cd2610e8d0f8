"""A diverging run: the loss or the gradient norm growing by orders of magnitude, judged at log steps only.

A too high learning rate makes the loss grow without bound while every value stays finite (3e31 at lr 1e6), so the
engine's non-finite handling never fires and the run would end "successfully". At each log step the loop hands
:class:`DivergenceWatch` what it has just read back anyway (the window's mean loss, the loss of the window's first
step, the gradient norm, the updates skipped for a non-finite loss): nothing else is read from the device. A window
whose loss or gradient norm exceeds ``train.divergence_factor`` times the lowest seen (the window's first loss
included), or that skipped updates, is bad: each one is a warning, and ``train.max_bad_windows`` of them in a row
stop the run with a clear message (the last checkpoint is intact).
"""

from __future__ import annotations

import math
from typing import Optional


class Diverged(Exception):
    """``train.max_bad_windows`` log windows in a row diverged or skipped updates; the message says which."""


def _growth(name: str, value: float, lowest: float, factor: float) -> Optional[str]:
    if not math.isfinite(value):
        return f"the {name} is {value}"
    if factor > 0 and 0 < lowest and value > factor * lowest:
        return f"the {name} {value:.3g} is {value / lowest:.1e} times its lowest so far ({lowest:.3g})"
    return None


class DivergenceWatch:
    """The run of bad log windows and the lowest loss and gradient norm seen.

    Args:
        factor: growth over the lowest value that counts as diverging (0 = only non-finite values count).
        max_bad_windows: bad windows in a row that stop the run (0 = warn only).
    """

    def __init__(self, factor: float, max_bad_windows: int) -> None:
        self.factor = factor
        self.max_bad_windows = max_bad_windows
        self.lowest_loss = math.inf
        self.lowest_grad_norm = math.inf
        self.bad_in_a_row = 0

    def judge(self, step: int, loss: float, grad_norm: Optional[float], first_loss: float,
              skipped: int) -> Optional[str]:
        """The warning for the window that ended at ``step`` (None when it is fine).

        Args:
            loss: the window's mean loss; ``first_loss``: the loss of its first applied update.
            grad_norm: the gradient norm of its last update (None when the engine does not report one).
            skipped: updates of the window discarded for a non-finite loss.

        Raises:
            Diverged: this is the ``max_bad_windows``-th bad window in a row.
        """
        if math.isfinite(first_loss):
            self.lowest_loss = min(self.lowest_loss, first_loss)
        problems = [p for p in (_growth("loss", loss, self.lowest_loss, self.factor),
                                None if grad_norm is None else
                                _growth("gradient norm", grad_norm, self.lowest_grad_norm, self.factor)) if p]
        if skipped:
            problems.append(f"{skipped} update(s) were skipped for a non-finite loss")
        if math.isfinite(loss):
            self.lowest_loss = min(self.lowest_loss, loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.lowest_grad_norm = min(self.lowest_grad_norm, grad_norm)
        if not problems:
            self.bad_in_a_row = 0
            return None
        self.bad_in_a_row += 1
        what = f"step {step}: the run is diverging: {'; '.join(problems)}"
        if self.max_bad_windows and self.bad_in_a_row >= self.max_bad_windows:
            raise Diverged(f"{what}. That is {self.bad_in_a_row} log windows in a row (train.max_bad_windows="
                           f"{self.max_bad_windows}); stopping. Lower optim.lr (or raise optim.warmup_steps), check "
                           "the data, and resume from the last checkpoint (or start over).")
        return (f"{what} ({self.bad_in_a_row} bad log window(s) in a row; train.max_bad_windows="
                f"{self.max_bad_windows} stops the run)")
