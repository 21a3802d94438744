"""pytest hooks and fixtures; the fake releases live in release_fixtures.py."""

import hashlib
import http.server
import json
import threading

import pytest
from fake_vllm import make_fake
from release_fixtures import RELEASE_FILES, VERSION, Project, make_patch, moe_with

from moepatch import logger


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the package index (skips when unreachable)")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_MOE_PATCHES_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    yield
    logger.handlers.clear()  # main() attached one to this test's captured stderr


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path / "project")


@pytest.fixture
def two_patches() -> dict[str, bytes]:
    first = make_patch(
        RELEASE_FILES, {"vllm/moe.py": moe_with(10, "line ten")}, "[MoE] Change line ten"
    )
    after_first = {**RELEASE_FILES, "vllm/moe.py": moe_with(10, "line ten")}
    second = make_patch(
        after_first, {"vllm/gate.py": "def gate(x):\n    return 2 * x\n"}, "[Model] Double the gate"
    )
    return {"line-ten.patch": first, "double-gate.patch": second}


class _Index(http.server.BaseHTTPRequestHandler):
    """A PEP 691 / PEP 503 index serving one sdist; behaviour set per test."""

    archive: bytes = b""
    mode = "json"

    def log_message(self, *args):
        pass

    def do_GET(self):
        sha = hashlib.sha256(self.archive).hexdigest()
        name = f"vllm-{VERSION}.tar.gz"
        if self.path == "/simple/vllm/":
            if self.mode == "html":
                body = f'<a href="../../files/{name}#sha256={sha}">{name}</a>'.encode()
                kind = "text/html"
            else:
                body = json.dumps(
                    {
                        "files": [
                            {"filename": name, "url": f"/files/{name}", "hashes": {"sha256": sha}}
                        ]
                    }
                ).encode()
                kind = "application/vnd.pypi.simple.v1+json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == f"/files/{name}":
            data = self.archive[:100] if self.mode == "truncate" else self.archive
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.archive)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)


@pytest.fixture
def served_index(project, monkeypatch):
    _Index.archive = project.tarball.read_bytes()
    _Index.mode = "json"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    yield _Index
    server.shutdown()


@pytest.fixture
def fake(tmp_path):
    """A fake built vLLM tree and its patches/ (fake_vllm.py)."""
    return make_fake(tmp_path)
