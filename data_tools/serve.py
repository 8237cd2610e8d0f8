"""A local HTTP file server for shards and images, with failures on demand: what the remote-shard tests and the
loader benchmark read from.

    with ShardServer(folder, fail_first=2, drop_first=1, broken={"train-3.tar"}) as server:
        url = server.url("train-0.tar")      # http://127.0.0.1:PORT/train-0.tar

It serves GET with single byte ranges (`Range: bytes=N-` and `N-M`, answered 206), on a thread bound to
127.0.0.1. Per file: the first `fail_first` requests get a 500, the next `drop_first` send the headers and part
of the body and then drop the connection; files named in `broken` always get a 500. `requests` records
(path, first byte) of every request (-1 for a 404).
"""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import unquote, urlparse

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 1 << 16


class ShardServer:
    """Serve `root` on 127.0.0.1 (an ephemeral port unless `port`); use as a context manager or start()/stop()."""

    def __init__(self, root: str | Path, *, fail_first: int = 0, drop_first: int = 0, drop_fraction: float = 0.5,
                 broken: Iterable[str] = (), port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.fail_first, self.drop_first, self.drop_fraction = fail_first, drop_first, drop_fraction
        self.broken = set(broken)
        self.requests: list[tuple[str, int]] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def start(self) -> "ShardServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _verdict(self, path: str, start: int) -> str:
        """ok, fail or drop for this request (counted per file)."""
        with self._lock:
            self.requests.append((path, start))
            n = self._seen.get(path, 0)
            self._seen[path] = n + 1
        if os.path.basename(path) in self.broken or n < self.fail_first:
            return "fail"
        return "drop" if n < self.fail_first + self.drop_first else "ok"

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: tests read `requests` instead
                pass

            def do_GET(self) -> None:
                rel = unquote(urlparse(self.path).path).lstrip("/")
                file = (server.root / rel).resolve()
                if server.root not in file.parents or not file.is_file():
                    with server._lock:
                        server.requests.append((rel, -1))
                    self.send_error(404)
                    return
                size = file.stat().st_size
                start, end = 0, size - 1
                match = RANGE.match(self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(end, int(match.group(2))) if match.group(2) else end
                    if start >= size:
                        self.send_error(416)
                        return
                verdict = server._verdict(rel, start)
                if verdict == "fail":
                    self.send_error(500, "injected failure")
                    return
                length = end - start + 1
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                send = int(length * server.drop_fraction) if verdict == "drop" else length
                with open(file, "rb") as f:
                    f.seek(start)
                    while send > 0:
                        data = f.read(min(CHUNK, send))
                        if not data:
                            break
                        self.wfile.write(data)
                        send -= len(data)
                if verdict == "drop":
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)

        return Handler
