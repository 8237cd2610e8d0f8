"""One writer per run directory: an exclusive lock held while `flowmatch train`, `flowmatch ema` or `flowmatch
export` writes into a folder.

The lock is ``FOLDER/.flowmatch.lock``: an ``fcntl.flock`` on the open file (the kernel drops it when the holder
exits, however it exits, so a crashed or killed holder never blocks the next one) and, inside, a JSON record of
the holder (host, PID, start time, command) for the messages. A live holder is refused with an error naming its
host and PID. A record left behind by a holder that died without releasing (SIGKILL, power loss) is reported
and taken over. Where ``flock`` is not available (some network file systems), the record decides: a live PID on
this host holds the lock, a dead one is stale.

Multi-process jobs take it on rank 0 only, before the other ranks go on (the trainer's barrier); they write into
the folder while rank 0 holds it. Release truncates nothing in place: it removes the file and then unlocks, and
a taker checks that the file it locked is still the one at the path, so two takers can never both hold it.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not on Windows: the PID record alone decides there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".flowmatch.lock"


class RunLocked(RuntimeError):
    """Another live process holds the folder's lock; the message names its host, PID and command."""


def describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"{record.get('command', 'a flowmatch process')} (PID {record.get('pid', '?')} on host "
            f"{record.get('host', '?')}, started {when})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The lock of `folder` for `command` (e.g. "flowmatch train"); use as a context manager or acquire/release.

    `acquire` raises RunLocked when a live process holds it; a stale record is taken over with a message.
    Released on `release`, on leaving the `with` block, and at interpreter exit (exceptions, SystemExit, Ctrl-C).
    """

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder} is a file, not a folder: choose a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise RunLocked(self._held_message(fd))
                if not self._same_file(fd):  # released (removed) between our open and our lock: try again
                    os.close(fd)
                    continue
                stale = read_record(fd)
                if stale:
                    print(f"{self.command}: taking over the lock of {self.folder}: its holder {describe(stale)} "
                          "is gone", flush=True)
                record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                          "command": self.command}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            atexit.register(self.release)
            return self

    def _lock(self, fd: int) -> bool:
        """Whether this process now holds the lock of `fd`."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        record = read_record(fd)  # no flock here: the record decides
        if not record:
            return True
        if record.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another host is alive
        pid = record.get("pid")
        return pid == os.getpid() or not (isinstance(pid, int) and pid_alive(pid))

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _held_message(self, fd: int) -> str:
        record = read_record(fd)
        holder = describe(record) if record else "another process"
        return (f"{self.folder} is in use by {holder}: only one process may write into a run directory at a time. "
                f"Wait for it to finish or stop it, or use another folder. If that process is gone on another "
                f"host, remove {self.path}.")

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        atexit.unregister(self.release)
        try:
            if self._same_file(fd):
                os.unlink(self.path)  # before unlocking: a waiting taker sees the file gone and opens a new one
        finally:
            os.close(fd)  # drops the flock


def read_record(fd: int) -> dict:
    """The holder record in the lock file ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
