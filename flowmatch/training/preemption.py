"""Preemption: SIGTERM or SIGUSR1 ends a run after the current optimizer step, with a checkpoint and status 0;
Ctrl-C (SIGINT) does the same and the command exits 130.

Schedulers stop jobs with SIGTERM and kill them some seconds later (SLURM's KillWait, Kubernetes'
terminationGracePeriodSeconds, spot reclaim notices); SLURM can also send a chosen signal ahead of the time
limit (``--signal=USR1@300``). The handler here only sets a flag. Once per optimizer step every rank calls
:meth:`Preemption.agreed`, an all-reduce of one number, so that all ranks see a request at the same step even
when the signal reached one rank only, or reached ranks at different steps; they finish that step, write a
checkpoint and return. Running the same command again resumes from it.

A second SIGTERM exits at once (status 143), without a checkpoint. Signals that arrive within
:data:`REPEAT_WINDOW_S` of the first count as the same request: a launcher forwarding the scheduler's signal to
a rank that the scheduler signalled too (``srun torchrun``) delivers it twice at once. Repeated SIGUSR1 never
exits: it only ever asks for a clean stop. A second Ctrl-C exits at once (status 130), like a second SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flowmatch.engine import Engine

# Repeats of a signal this soon after the first are the same request delivered twice (see the module docstring).
REPEAT_WINDOW_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Signals whose repeat (after REPEAT_WINDOW_S) exits at once, without a checkpoint.
_IMPATIENT = (signal.SIGTERM, signal.SIGINT)


def _say(text: str) -> None:
    """Write to stderr without Python's buffered streams, which a signal handler may interrupt mid-write."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class Preemption:
    """Context manager that turns SIGTERM and SIGUSR1 into a request to stop cleanly.

    Args:
        rank: this process's rank (named in the messages).
        signals: the signals that ask for a stop.

    Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) the
    signals keep their previous handling and :attr:`received` stays None.
    """

    def __init__(self, rank: int = 0, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.rank = rank
        self.signals = signals
        self.received: str | None = None
        """Name of the first stop signal this process received, if any."""
        self.received_at: float | None = None
        """time.monotonic() when it arrived."""
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> Preemption:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
                # Restart interrupted system calls (a collective's socket reads) instead of failing them with EINTR.
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a data worker forked with this handler (Ctrl-C reaches the whole group)
            return
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self.received_at = name, now
            again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            _say(f"[flowmatch rank {self.rank}] received {name}: finishing the current optimizer step, then writing "
                 f"a checkpoint and exiting (a second {again} exits at once, without one)\n")
        elif signum in _IMPATIENT and now - (self.received_at or now) >= REPEAT_WINDOW_S:
            _say(f"[flowmatch rank {self.rank}] received {name} again: exiting now, without a checkpoint\n")
            os._exit(128 + signum)

    def agreed(self, engine: Engine) -> bool:
        """Collective, once per optimizer step on every rank: whether any rank has received a stop signal.

        One all-reduce of one number; the step has synchronised with the host already, so the read-back costs
        no extra wait.
        """
        mine = self.received is not None
        if engine.world_size == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=engine.device)
        return bool(engine.all_reduce_sum(flag).item() > 0)
