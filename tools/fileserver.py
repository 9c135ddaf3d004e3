"""A small HTTP file server with Range requests, for the dry run, the tests and the benchmarks: aria2c
resumes against it exactly as against the dataset's host (Python's http.server has no Range support).

    python -m tools.fileserver --root DIR --port-file FILE [--rate BYTES_PER_S]

Binds 127.0.0.1 on a free port (written to FILE), serves GET and HEAD with ``Range: bytes=a-b`` (206, 416),
Last-Modified and, optionally, a per-request rate limit so that a download lasts long enough to watch or
interrupt. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class RangeServer:
    root: Path
    rate: int | None = None  # bytes per second per request (None: as fast as possible)
    requests: list[Request] = field(default_factory=list)
    _httpd: _Server | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> RangeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, headers: dict[str, str], rng: str | None) -> None:
                server.requests.append(Request(self.command, self.path, rng, status))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

            def _send(self, head_only: bool) -> None:
                p = (server.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
                rng = self.headers.get("Range")
                if server.root.resolve() not in p.parents or not p.is_file():
                    self._reply(404, {"Content-Length": "10"}, rng)
                    if not head_only:
                        self.wfile.write(b"not found\n")
                    return
                size = p.stat().st_size
                start, end, status = 0, size - 1, 200
                m = re.match(r"bytes=(\d*)-(\d*)$", (rng or "").strip())
                if m and (m.group(1) or m.group(2)):
                    status = 206
                    if m.group(1):
                        start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
                    else:
                        start = max(0, size - int(m.group(2)))
                    if start >= size or start > end:
                        self._reply(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"}, rng)
                        return
                headers = {
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                    "Last-Modified": email.utils.formatdate(p.stat().st_mtime, usegmt=True),
                    "Content-Length": str(end - start + 1),
                }
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                self._reply(status, headers, rng)
                if head_only:
                    return
                left = end - start + 1
                with open(p, "rb") as f:
                    f.seek(start)
                    while left > 0:
                        data = f.read(min(16384, left))
                        if not data:
                            break
                        try:
                            self.wfile.write(data)
                        except (BrokenPipeError, ConnectionResetError):
                            return
                        left -= len(data)
                        if server.rate:
                            time.sleep(len(data) / server.rate)

            def do_GET(self) -> None:
                self._send(head_only=False)

            def do_HEAD(self) -> None:
                self._send(head_only=True)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fileserver")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--port-file", type=Path, required=True, help="where the chosen URL is written")
    ap.add_argument("--rate", type=int, default=None, help="bytes per second per request")
    args = ap.parse_args(argv)
    server = RangeServer(args.root, rate=args.rate).start()
    args.port_file.write_text(server.url + "\n")
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
