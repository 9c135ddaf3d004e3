"""Loopback stand-ins for the bootstrap tests: a Range-capable HTTP file server and a GCE metadata server.

Both bind 127.0.0.1 on a free port and run in a daemon thread of the test process.
"""

from __future__ import annotations

import email.utils
import os
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
class RequestLog:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class RangeServer:
    """Serves files under ``root`` with HEAD, ``Range: bytes=a-b`` (206/416), Last-Modified, and an
    optional per-request rate limit (bytes/s) so that a download can be interrupted part-way."""

    root: Path
    rate: int | None = None
    requests: list[RequestLog] = field(default_factory=list)
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

            def _send(self, head_only: bool) -> None:
                rel = self.path.split("?", 1)[0].lstrip("/")
                p = (server.root / rel).resolve()
                rng = self.headers.get("Range")
                if server.root.resolve() not in p.parents or not p.is_file():
                    server.requests.append(RequestLog(self.command, self.path, rng, 404))
                    body = b"not found\n"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head_only:
                        self.wfile.write(body)
                    return
                size = p.stat().st_size
                start, end, status = 0, size - 1, 200
                if rng:
                    m = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
                    if m and (m.group(1) or m.group(2)):
                        if m.group(1):
                            start = int(m.group(1))
                            end = int(m.group(2)) if m.group(2) else size - 1
                        else:
                            start = max(0, size - int(m.group(2)))
                        end = min(end, size - 1)
                        status = 206
                        if start >= size or start > end:
                            server.requests.append(RequestLog(self.command, self.path, rng, 416))
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{size}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                server.requests.append(RequestLog(self.command, self.path, rng, status))
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Last-Modified", email.utils.formatdate(p.stat().st_mtime, usegmt=True))
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if head_only:
                    return
                left = end - start + 1
                chunk = 16384
                with open(p, "rb") as f:
                    f.seek(start)
                    while left > 0:
                        data = f.read(min(chunk, left))
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


@dataclass
class MetadataServer:
    """The GCE metadata protocol on loopback: ``/computeMetadata/v1/<path>``; 403 without the header
    ``Metadata-Flavor: Google``; 404 for a missing key; ``instance/attributes/<key>`` from ``attributes``."""

    attributes: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, int]] = field(default_factory=list)
    _httpd: _Server | None = None

    def __post_init__(self) -> None:
        defaults = {
            "instance/preempted": "FALSE",
            "instance/name": "preprocess-vm",
            "instance/zone": "projects/123456/zones/us-central1-a",
            "instance/hostname": "preprocess-vm.c.test-project.internal",
            "instance/maintenance-event": "NONE",
            "project/project-id": "test-project",
        }
        for k, v in defaults.items():
            self.values.setdefault(k, v)

    @property
    def host(self) -> str:
        """Value for GCE_METADATA_HOST (host:port)."""
        assert self._httpd is not None
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> MetadataServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: str, head_only: bool = False) -> None:
                data = body.encode()
                server.requests.append((self.path, status))
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/text")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head_only:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._reply(403, "Missing required header: Metadata-Flavor\n")
                    return
                path = self.path.split("?", 1)[0]
                prefix = "/computeMetadata/v1/"
                if not path.startswith(prefix):
                    self._reply(404, "not found\n")
                    return
                key = path[len(prefix) :]
                if key.startswith("instance/attributes/"):
                    name = key[len("instance/attributes/") :]
                    if name in server.attributes:
                        self._reply(200, server.attributes[name])
                        return
                elif key in server.values:
                    self._reply(200, server.values[key])
                    return
                self._reply(404, "not found\n")

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def free_env() -> dict[str, str]:
    """The current environment without anything that would point a script at real Google endpoints."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("TRIPLET_", "GCE_METADATA", "STORAGE_EMULATOR", "CLOUDSDK_", "GOOGLE_")):
            del env[k]
    return env
