"""Data-loading worker processes die with the process that started them.

A trainer killed with SIGKILL runs no clean-up, and its DataLoader workers (each holding decoded batches and
shuffle buffers, hundreds of MB) would be reparented to PID 1 and live on. `die_with_parent` is the workers'
`worker_init_fn`: on Linux it asks the kernel for SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG), and
elsewhere a daemon thread polls the parent's PID and ends the worker when it changes. (torch's workers check
their parent too, but only between two batches: one blocked on a stalled shard server lives on for minutes.)
Linux sends the signal when the *thread* that started the worker ends, so a loader is iterated by a thread that
outlives its workers, as the trainer's main thread does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int) -> None:
    """End this process (without clean-up: its parent is gone) once its parent PID is no longer `parent`."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn` (bind `parent`, the loader's PID, with functools.partial): this worker ends
    when that process does, however it ends."""
    if not parent_death_signal(signal.SIGKILL):
        threading.Thread(target=watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)
