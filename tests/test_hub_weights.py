"""Pretrained weights from the hub, the production path (configs/vm.yaml: `pretrained: true`, no file).

The hub cannot be reached from here, so a stand-in on 127.0.0.1 answers the requests huggingface_hub's
`hf_hub_download` really makes (HF_ENDPOINT points it there): HEAD and GET on
`/<repo>/resolve/<revision>/<file>` answered, as the hub does for LFS files, with a redirect to a content URL
and the headers X-Repo-Commit, X-Linked-Etag (the content's SHA-256) and X-Linked-Size. The processor runs as
a real subprocess, because huggingface_hub reads HF_ENDPOINT when it is imported.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h5py
import pytest
from engine_helpers import assert_same_arrays, load, run_cli, tiny_config

from building_image_triplet_model.exit_codes import Exit

REPO_ID = "timm/test_resnet.r160_in1k"  # timm's hf_hub_id for the tiny test model
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubStandIn:
    """The hub and, on another origin as the real one's is, its content server: huggingface_hub follows a
    redirect only within the hub's origin, so the metadata must be on the redirect itself."""

    files: dict[str, bytes]  # "<repo>/<file>" -> content
    requests: list[tuple[str, str]] = field(default_factory=list)
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> HubStandIn:
        hub = self
        blobs = {hashlib.sha256(data).hexdigest(): data for data in self.files.values()}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            is_cdn = False

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _empty(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": "0"}.items():
                    self.send_header(k, v)
                self.end_headers()

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, ("cdn:" if self.is_cdn else "") + path))
                if self.is_cdn:
                    data = blobs.get(path.lstrip("/"))
                    if data is None:
                        self._empty(404, {})
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
                repo, sep, rest = path.lstrip("/").partition("/resolve/")
                _revision, _, name = rest.partition("/")
                data = hub.files.get(f"{repo}/{name}") if sep else None
                if data is None:
                    self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                    return
                digest = hashlib.sha256(data).hexdigest()
                self._empty(
                    302,
                    {
                        "Location": f"{hub.cdn}/{digest}",
                        "X-Repo-Commit": COMMIT,
                        "X-Linked-Etag": f'"{digest}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": '"a-git-blob-id"',
                    },
                )

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

        class CdnHandler(Handler):
            is_cdn = True

        for handler in (Handler, CdnHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded weights of the tiny model as a safetensors file: what the hub serves."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}


def test_hub_weights_are_fetched_before_indexing_and_loaded_for_real(archives, tmp_path, weights):
    hub = HubStandIn({f"{REPO_ID}/model.safetensors": weights.read_bytes()}).start()
    try:
        cfg_path = tiny_config(tmp_path / "hub", archives[0], pretrained=True)
        r = run_cli("dataset_processor", "--config", str(cfg_path), env=hub_env(tmp_path, hub.endpoint))
    finally:
        hub.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("HEAD", f"/{REPO_ID}/resolve/main/model.safetensors") in hub.requests
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ("GET", f"cdn:/{digest}") in hub.requests
    _, layout = load(cfg_path)
    with h5py.File(layout.output) as f:
        assert f.attrs["weights"] == f"sha256:{digest}"
    # The same file given as a local weights file: the same model key, the same artifact to the bit.
    local_path = tiny_config(tmp_path / "local", archives[0], pretrained=True, weights_path=str(weights))
    local = run_cli("dataset_processor", "--config", str(local_path))
    assert local.returncode == 0, local.stderr[-3000:]
    assert_same_arrays(load(local_path)[1].output, layout.output)

    # Later boots read the cache on the work disk: no hub needed.
    again = tiny_config(tmp_path / "again", archives[0], pretrained=True)
    r = run_cli("dataset_processor", "--config", str(again), env=hub_env(tmp_path, hub.endpoint))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_arrays(load(again)[1].output, layout.output)


@pytest.mark.parametrize("answer", ["closed port", "no such file"])
def test_a_hub_that_cannot_give_the_weights_fails_at_once_writing_nothing(archives, tmp_path, answer):
    hub = HubStandIn({}).start()
    endpoint = hub.endpoint if answer == "no such file" else f"http://127.0.0.1:{closed_port()}"
    try:
        cfg_path = tiny_config(tmp_path / "c", archives[0], pretrained=True)
        r = run_cli("dataset_processor", "--config", str(cfg_path), env=hub_env(tmp_path, endpoint))
    finally:
        hub.stop()
    assert r.returncode == Exit.MODEL, r.stderr[-3000:]
    assert f"cannot get {REPO_ID}/model.safetensors from the hub" in r.stderr
    assert "indexing" not in r.stderr and "Traceback" not in r.stderr
    assert not load(cfg_path)[1].output.parent.exists()  # nothing was done or written
