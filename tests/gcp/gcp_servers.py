"""The GCE metadata server stand-in for the bootstrap tests: the real protocol on 127.0.0.1 (a free port, a
daemon thread of the test process). The tests' HTTP file server is the package's own
``tools.fileserver.RangeServer``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


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
