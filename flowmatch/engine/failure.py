"""Ending the whole job promptly when one rank fails.

Wrap each process's main in :func:`run_guarded`. A rank that raises prints its traceback, leaves a notice in the
rendezvous store and exits; every other rank sees the notice (or the store vanishing) within about a second
through the watch thread the :class:`~flowmatch.engine.Engine` starts, and exits non-zero too, instead of
blocking in a collective until ``distributed.timeout_s``.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# How often each rank looks for another rank's failure notice. One second is prompt next to a collective
# timeout of minutes and costs one tiny store request per second.
_ABORT_POLL_S = 1.0
# How long a failing rank spends trying to leave its notice before it exits anyway.
_ABORT_PUBLISH_S = 5.0


def _abort_key() -> str:
    # torchrun keeps its store across restarts: scope the notice to this attempt so a restart is not killed by
    # the previous attempt's notice.
    return f"flowmatch/abort/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _die(rank: int | str, message: str, status: int = 1) -> None:
    sys.stderr.write(f"[flowmatch rank {rank}] {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


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


# This process's watch, started by the Engine of a multi-process job and read by run_guarded.
_WATCH: _AbortWatch | None = None


def start_abort_watch(store: Any, rank: int) -> None:
    """Watch ``store`` for another rank's failure notice from now on (once per process; later calls do nothing)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = _AbortWatch(store, rank)
        # Interpreter teardown may outlive the store's host; only failures inside the run should stop us.
        atexit.register(_WATCH.stop)


def stop_abort_watch() -> None:
    """Stop watching (before the final barrier: after it the store's host rank may exit at any moment)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
        _WATCH = None


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as this process's main so that a failure on one rank ends all ranks promptly.

    On an exception (or a non-zero ``SystemExit``) the traceback is printed with the rank, a notice is left for
    the other ranks (see :class:`~flowmatch.engine.Engine`), and the process exits with status 1 at once,
    skipping interpreter teardown that could block on a half-finished collective. Returns ``fn``'s result
    otherwise. Ctrl-C outside the training loop (which turns it into a clean stop) is one line and status 130.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        reason, details = f"exited with status {exc.code}", ""
    except KeyboardInterrupt:
        if _WATCH is not None:
            _WATCH.publish(f"rank {os.environ.get('RANK', '0')} was interrupted (Ctrl-C)")
        _die(os.environ.get("RANK", "0"), "interrupted (Ctrl-C): exiting with status 130", 130)
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
