"""pytest hooks and fixtures; the fake releases live in release_fixtures.py."""

import pytest
from fake_vllm import make_fake
from release_fixtures import RELEASE_FILES, Project, make_patch, moe_with

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


@pytest.fixture
def fake(tmp_path):
    """A fake built vLLM tree and its patches/ (fake_vllm.py)."""
    return make_fake(tmp_path)
