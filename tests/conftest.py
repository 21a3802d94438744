"""Hermetic fixtures: a fake vLLM release as an sdist tarball, its pin, a series."""

import hashlib
from pathlib import Path

import pytest
from release_fixtures import write_tarball

from moepatch import gitutil, logger
from moepatch.cli import main

VERSION = "9.9.9"
COMMIT = "abcdef123"

RELEASE_FILES = {
    "vllm/_version.py": (
        f"__version__ = version = '{VERSION}'\n"
        f"__version_tuple__ = version_tuple = (9, 9, 9)\n"
        f"__commit_id__ = commit_id = 'g{COMMIT}'\n"
    ),
    "vllm/moe.py": "".join(f"line {i}\n" for i in range(1, 41)),
    "vllm/gate.py": "def gate(x):\n    return x\n",
    "tests/test_moe.py": "def test_ok():\n    assert True\n",
    # vLLM's sdist ships a .gitignore that hides _version.py; the base must not.
    ".gitignore": "vllm/_version.py\n",
}


def make_tarball(path: Path, files: dict[str, str], top: str = f"vllm-{VERSION}") -> str:
    write_tarball(path, top, files)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin_text(sha256: str, version: str = VERSION, commit: str = COMMIT) -> str:
    return (
        f'version = "{version}"\ntag = "v{version}"\ncommit = "{commit}"\n'
        'repository = "https://example.invalid/vllm"\n\n'
        f'[sdist]\nfilename = "vllm-{version}.tar.gz"\nsha256 = "{sha256}"\n'
    )


def make_patch(
    base_files: dict[str, str],
    edits: dict[str, str],
    subject: str,
    trailers: str = "Upstream: not yet\nStatus: pending\nTests: tests/test_moe.py",
    date: str = "2026-11-25T12:00:00+00:00",
) -> bytes:
    """A format-patch file turning base_files into base_files|edits."""
    import tempfile

    from moepatch.export import FORMAT_PATCH

    with tempfile.TemporaryDirectory() as d:
        repo = Path(d)
        gitutil.run(repo, "init", "-q")
        for name, text in base_files.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        gitutil.run(repo, "add", "-A", "-f")
        env = gitutil.env_for(gitutil.BASE_AUTHOR, date)
        gitutil.run(repo, "commit", "-q", "-m", "base", env=env)
        for name, text in edits.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        gitutil.run(repo, "add", "-A", "-f")
        message = f"{subject}\n\nWhy this change matters.\n\n{trailers}\n"
        env = gitutil.env_for(("Dev", "dev@example.invalid"), date)
        gitutil.run(repo, "commit", "-q", "-m", message, env=env)
        gitutil.run(repo, *FORMAT_PATCH, "-o", "out", "-1", "HEAD")
        return next((repo / "out").glob("*.patch")).read_bytes()


def moe_with(line_no: int, text: str, files=RELEASE_FILES) -> str:
    lines = files["vllm/moe.py"].splitlines(keepends=True)
    lines[line_no - 1] = text + "\n"
    return "".join(lines)


class Project:
    """A checkout of this project in tmp_path: vllm.pin, patches/, a release tarball."""

    def __init__(self, root: Path):
        self.root = root
        self.patches = root / "patches"
        self.patches.mkdir(parents=True)
        self.tarball = root / f"vllm-{VERSION}.tar.gz"
        self.sha = make_tarball(self.tarball, RELEASE_FILES)
        self.pin = root / "vllm.pin"
        self.pin.write_text(pin_text(self.sha))
        self.target = root / "build" / "vllm"
        self.set_series({})

    def set_series(self, patches: dict[str, bytes], comment: str = "# order\n") -> None:
        for old in self.patches.glob("*.patch"):
            old.unlink()
        for name, data in patches.items():
            (self.patches / name).write_bytes(data)
        (self.patches / "series").write_text(comment + "".join(f"{n}\n" for n in patches))

    def run(self, command: str = "apply", *rest: str) -> int:
        args = [command, *rest, "--pin", str(self.pin), "--patches", str(self.patches)]
        if command in ("apply", "check") and "--source" not in rest:
            args += ["--source", str(self.tarball)]
        if command in ("apply", "status", "export") and "--target" not in rest:
            args += ["--target", str(self.target)]
        return main(args)

    def git(self, *args: str) -> str:
        return gitutil.out(self.target, *args)


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
