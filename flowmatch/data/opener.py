"""Opening shards: local files, http(s) URLs and pipe: commands through one opener that retries.

Every shard is read through `open_shard`, which returns a stream that survives transient failures: a refused or
dropped connection, an HTTP 5xx/429/408, a stalled read past `timeout_s`, a pipe command that exits non-zero.
After a failure the stream waits (exponential back-off from `backoff_s`, capped at `max_backoff_s`), opens the
shard again at the byte it had reached (an HTTP range request; a pipe runs again and the bytes already delivered
are discarded) and carries on, so the tar reader above never notices. When `retries` failures have been spent on
one shard, it raises `ShardUnavailable`, which the tar reader turns into a "shard failed after retries" record:
skipped and counted like a truncated shard. A permanent failure (HTTP 404, a missing local file) is not retried
and counts as an "unreadable shard".

Local uncompressed `.tar` files and `.tar` URLs can start at a byte offset (a seek, a range request): a resumed
loader reads only the shards its saved position names, from where it names. Other schemes (gs://, s3:// through
webdataset's gopen handlers) are opened by webdataset's `gopen` and read from the beginning.

Commands: a `pipe:` shard is run without a shell, as the argument list `shlex` splits it into (no `;` chaining, no
pipes, no redirection; `pipe:sh -c '...'` asks for a shell explicitly), and a URL that webdataset would paste into
a shell command line (gs:, scp:, ...) may not hold a quote. `runs_command` says which shards run a program: a
recipe read back from a run, a checkpoint or an export may name none of them (flowmatch.data.trust).
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import select
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional
from urllib.parse import urlparse

from webdataset.gopen import gopen

from flowmatch.data.tarformat import COMPRESSED

log = logging.getLogger("flowmatch.data")

# HTTP statuses worth retrying: server errors, throttling, request timeout.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
READ_CHUNK = 1 << 16
SHARD_FAILED = "shard failed after retries"
"""The BadRecord reason (and counter name) of a shard given up on."""


@dataclass(frozen=True)
class RetryPolicy:
    """The recipe's `data.remote` section: how hard to try each shard (plain data: it pickles into workers)."""

    retries: int = 5
    """Failures tolerated per shard (reopened where it stopped each time) before it is skipped and counted."""
    backoff_s: float = 1.0
    """Wait after the first failure; doubled after each further one."""
    max_backoff_s: float = 30.0
    """Longest wait between two attempts."""
    timeout_s: float = 60.0
    """A connection, HTTP read or pipe read that stalls this long fails (and is retried)."""

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"data.remote.retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("data.remote.backoff_s and data.remote.max_backoff_s must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"data.remote.timeout_s must be > 0, got {self.timeout_s}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure (1, 2, ...)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))


UNREADABLE = "unreadable shard"
"""The BadRecord reason of a shard that failed for good at once (a missing file, HTTP 404): never retried."""


class ShardUnavailable(OSError):
    """A shard that could not be read after every retry, or failed permanently; `reason` says which."""

    def __init__(self, message: str, reason: str = SHARD_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


class PermanentError(OSError):
    """A failure retrying cannot fix (HTTP 404, a missing local file)."""


def is_http(url: str) -> bool:
    return urlparse(url).scheme in ("http", "https")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return not url.startswith("pipe:") and (len(scheme) <= 1 or scheme == "file")


def runs_command(url: str) -> bool:
    """Whether opening `url` runs a program: a pipe: command, or a scheme webdataset's gopen opens with one (gs:,
    ais:, scp:, hf: ...). Local files and http(s) URLs are read by flowmatch itself."""
    return url.startswith("pipe:") or not (is_local(url) or is_http(url))


SHELL_OPERATORS = frozenset(";&|<>()")


def pipe_argv(command: str) -> list[str]:
    """The argument list a `pipe:` command runs as (no shell); ValueError naming what needs a shell."""
    lexer = shlex.shlex(command, posix=False, punctuation_chars=True)  # quotes kept: operators stand alone
    lexer.whitespace_split = True
    try:
        words = list(lexer)
        argv = shlex.split(command)
    except ValueError as err:
        raise ValueError(f"pipe:{command}: {err}") from None
    shell = [w for w in words if set(w) <= SHELL_OPERATORS or (w[0] not in "'\"" and ("`" in w or "$" in w))]
    if shell or not argv:
        raise ValueError(
            f"pipe:{command}: " + (f"uses the shell ({' '.join(shell)})" if shell else "names no command") + ", "
            "but pipe: commands run without a shell (as the argument list shlex splits them into: no ';' chaining, "
            "pipes, redirection or $ expansion). Write one command, or ask for a shell explicitly: "
            "pipe:sh -c '...'")
    return argv


def check_gopen_url(url: str) -> None:
    """webdataset's gopen pastes a URL between single quotes into a shell command: one holding a quote or a line
    break could run more than the download."""
    if "'" in url or "\n" in url:
        raise ValueError(f"shard URL {url!r} holds a quote or a line break, which webdataset's gopen would pass "
                         "to a shell; rename the shard or read it through pipe:")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def can_seek(url: str) -> bool:
    """Whether a read of `url` can start at a byte offset: uncompressed tars, local or over HTTP."""
    if not (is_local(url) or is_http(url)):
        return False
    path = local_path(url) if is_local(url) else urlparse(url).path
    return path.endswith(".tar")


# ----------------------------------------------------------------------------------------------- sources


# Sources open a shard at a byte offset of its stored (possibly compressed) bytes and say where they are: at the
# offset, or at 0 when they cannot start elsewhere.


def open_local(url: str, offset: int, policy: RetryPolicy) -> tuple[BinaryIO, int]:
    try:
        f = open(local_path(url), "rb")
    except FileNotFoundError as err:
        raise PermanentError(f"no such file: {err.filename}") from None
    f.seek(offset)
    return f, offset


def open_http(url: str, offset: int, policy: RetryPolicy) -> tuple[BinaryIO, int]:
    """A response positioned at `offset` (206) or at 0 when the server ignores ranges."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=policy.timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code in TRANSIENT_STATUS:
            raise OSError(f"HTTP {err.code} {err.reason}") from None
        raise PermanentError(f"HTTP {err.code} {err.reason}") from None
    return HttpStream(response), offset if response.status == 206 else 0


class HttpStream:
    """An HTTP response body that raises on a body cut short (http.client returns b"" there, as if complete)."""

    def __init__(self, response) -> None:
        self.response = response

    def read(self, n: int) -> bytes:
        data = self.response.read(n)
        if not data and n and (self.response.length or 0) > 0:
            raise http.client.IncompleteRead(b"", self.response.length)
        return data

    def close(self) -> None:
        self.response.close()


class PipeStream:
    """stdout of a command (run without a shell, see `pipe_argv`), with a stall timeout; a non-zero exit at the end
    is an error."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self.command, self.timeout_s = command, timeout_s
        self.proc = subprocess.Popen(pipe_argv(command), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=0)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            raise TimeoutError(f"pipe command sent nothing for {self.timeout_s:.0f} s")
        data = os.read(self.fd, n)
        if not data:
            code = self.proc.wait(timeout=self.timeout_s)
            if code != 0:
                raise OSError(f"pipe command exited with status {code}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


def open_pipe(url: str, offset: int, policy: RetryPolicy) -> tuple[BinaryIO, int]:
    return PipeStream(url[len("pipe:"):], policy.timeout_s), 0  # type: ignore[return-value]


def open_gopen(url: str, offset: int, policy: RetryPolicy) -> tuple[BinaryIO, int]:
    check_gopen_url(url)
    return gopen(url, "rb"), 0


def source_for(url: str) -> Callable[[str, int, RetryPolicy], tuple[BinaryIO, int]]:
    if url.startswith("pipe:"):
        return open_pipe
    if is_http(url):
        return open_http
    if is_local(url):
        return open_local
    return open_gopen


# ----------------------------------------------------------------------------------------------- the stream


TRANSIENT = (OSError, http.client.HTTPException)


class RetryingStream:
    """A readable stream of one shard's stored bytes from byte `start`, reopening itself where it stood after a
    failure."""

    def __init__(self, url: str, start: int, policy: RetryPolicy) -> None:
        self.url, self.policy = url, policy
        self.pos = start
        self.failures = 0
        self._open_source = source_for(url)
        self._raw: Optional[BinaryIO] = None
        self._at = 0
        self._open()

    def _fail(self, err: BaseException) -> None:
        """Count a failure: wait and return to retry, or raise ShardUnavailable when the budget is spent."""
        self._close_raw()
        if isinstance(err, PermanentError):
            raise ShardUnavailable(f"{err}", UNREADABLE) from None
        self.failures += 1
        if self.failures > self.policy.retries:
            raise ShardUnavailable(f"{type(err).__name__}: {err} ({self.policy.retries} retries spent)") from None
        delay = self.policy.delay(self.failures)
        log.warning("data: %s: %s: %s; retry %d of %d in %.1f s", self.url, type(err).__name__, err,
                    self.failures, self.policy.retries, delay)
        time.sleep(delay)

    def _open(self) -> None:
        while True:
            try:
                self._raw, self._at = self._open_source(self.url, self.pos, self.policy)
                self._skip_to_pos()
                return
            except TRANSIENT as err:
                self._fail(err)

    def _skip_to_pos(self) -> None:
        """Discard what a reopened source delivers before `pos` (sources that cannot start at an offset)."""
        gap = self.pos - self._at
        while gap > 0:
            data = self._raw.read(min(gap, READ_CHUNK))
            if not data:
                raise OSError("the shard is shorter than on the previous attempt")
            gap -= len(data)
        self._at = self.pos

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes; fewer only at the end of the shard (n < 0: everything left)."""
        out = bytearray()
        while n < 0 or len(out) < n:
            want = READ_CHUNK if n < 0 else n - len(out)
            try:
                data = self._raw.read(want)
            except TRANSIENT as err:
                self._fail(err)
                self._open()
                continue
            self.pos += len(data)
            if len(data) == n and not out:  # the common case: one read, no copy
                return data
            if not data:
                break
            out += data
        return bytes(out)

    def readable(self) -> bool:
        return True

    def _close_raw(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # closing a failed source may fail again; nothing is left to do with it
                pass
            self._raw = None

    def close(self) -> None:
        self._close_raw()


@functools.lru_cache(maxsize=4096)  # asked once per place a resumed loader reads back
def looks_compressed(url: str) -> bool:
    """A local file whose first bytes are a gzip, bzip2 or xz magic number, whatever its name says."""
    if not is_local(url):
        return False
    try:
        with open(local_path(url), "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return head.startswith(tuple(magic for magic, _ in COMPRESSED))


def open_shard(url: str, start: int = 0, policy: RetryPolicy = RetryPolicy()) -> tuple[RetryingStream, bool]:
    """(stream, positioned): `url` opened at archive offset `start` when it can seek there (positioned=True), else
    at its beginning; ShardUnavailable when it cannot be opened within the policy's retries."""
    first = start if start and can_seek(url) and not looks_compressed(url) else 0
    return RetryingStream(url, first, policy), first == start
