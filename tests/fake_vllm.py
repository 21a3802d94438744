"""A tiny fake vLLM tree for the tests of `apply.py test`: a git checkout (tag
vllm-base, branch patched) with a few pytest files, and a patches/ directory
whose series names them in `Tests:` trailers."""

import json
import subprocess
from pathlib import Path

from moepatch.testing import command

TEST_A = """
import pytest

def test_pass():
    assert True

def test_fail():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="needs a GPU we do not have")
def test_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n
"""
TEST_B = "def test_one():\n    assert True\n\ndef test_two():\n    assert True\n"
TEST_SKIPS = (
    "import pytest\n\n"
    "pytestmark = pytest.mark.skip(reason='CUDA only')\n\n"
    "def test_s():\n    pass\n"
)
TEST_EMPTY = "X = 1\n"
TEST_BROKEN = "import does_not_exist_anywhere\n\ndef test_x():\n    pass\n"
# test_slow sleeps far longer than the stop grace: only a stop ends it
TEST_SLOW = "import time\n\ndef test_fast():\n    pass\n\ndef test_slow():\n    time.sleep(600)\n"


def patch_text(name: str, tests: list[str]) -> str:
    trailers = "".join(f"Tests: {t}\n" for t in tests)
    return (
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: vllm-moe-patches <vllm-moe-patches@users.noreply.github.com>\n"
        "Date: Wed, 25 Nov 2026 12:00:00 +0000\n"
        f"Subject: [MoE] {name}\n\n"
        "Body.\n\n"
        "Upstream: not yet\nStatus: pending\n"
        f"{trailers}"
        "Signed-off-by: vllm-moe-patches <vllm-moe-patches@users.noreply.github.com>\n"
        "---\n"
        "diff --git a/vllm/x.py b/vllm/x.py\n"
        "--- a/vllm/x.py\n+++ b/vllm/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    )


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def make_fake(tmp_path: Path) -> tuple[Path, Path]:
    """A fake built tree (git, tag vllm-base, branch patched) and patches dir."""
    tree = tmp_path / "tree"
    files = {
        "vllm/__init__.py": "",
        "vllm/_version.py": "__version__ = version = '9.9.9'\n",
        "tests/__init__.py": "",
        "tests/kernels/__init__.py": "",
        "tests/kernels/test_a.py": TEST_A,
        "tests/kernels/test_b.py": TEST_B,
        "tests/kernels/test_skips.py": TEST_SKIPS,
        "tests/kernels/test_empty.py": TEST_EMPTY,
        "tests/kernels/test_broken.py": TEST_BROKEN,
        "tests/kernels/test_slow.py": TEST_SLOW,
        ".gitignore": "*.so\n__pycache__/\n",
    }
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    git(tree, "init", "-q", "-b", "patched")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "base")
    git(tree, "tag", "vllm-base")
    new = tree / "tests/kernels/test_new.py"  # the patch's own new test
    new.write_text("def test_new():\n    assert True\n")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "patch")

    patches = tmp_path / "patches"
    patches.mkdir()
    series = {
        "one.patch": ["tests/kernels/test_a.py", "tests/kernels/test_b.py::test_one"],
        "two.patch": ["tests/kernels/test_b.py", "tests/kernels/test_new.py"],
        "skips.patch": ["tests/kernels/test_skips.py"],
        "empty.patch": ["tests/kernels/test_empty.py"],
        "broken.patch": ["tests/kernels/test_broken.py"],
        "slow.patch": ["tests/kernels/test_slow.py"],
        "gone.patch": ["tests/kernels/test_missing.py", "tests/kernels/test_b.py"],
    }
    for name, tests in series.items():
        (patches / name).write_text(patch_text(name, tests))
    (patches / "series").write_text("".join(n + "\n" for n in series))
    (patches / "tests.toml").write_text(
        '[patch."one.patch"]\n'
        'tests = [{ test = "tests/kernels/test_b.py::test_two", reason = "also covers it" }]\n'
        '[all-moe]\ntests = [{ test = "tests/kernels", reason = "everything" }]\n'
        "[device.cpu]\n"
        'exclude = [{ test = "tests/kernels/test_broken.py", '
        'reason = "imports a GPU-only module" }]\n'
        "[device.cuda]\nexclude = []\n"
    )
    return tree, patches


def run_apply_test(fake, tmp_path, *argv: str) -> tuple[int, dict, str]:
    """`python -m moepatch.testing` on the fake tree: (exit code, JSON summary, JUnit XML)."""
    tree, patches = fake
    out = tmp_path / "result.json"
    junit = tmp_path / "result.xml"
    rc = command.main(
        [
            "--tree",
            str(tree),
            "--patches",
            str(patches),
            "--json",
            str(out),
            "--junit",
            str(junit),
            "-q",
            *argv,
        ]
    )
    result = json.loads(out.read_text()) if out.is_file() else {}
    return rc, result, junit.read_text() if junit.is_file() else ""


def group_row(result: dict, name: str) -> dict:
    """The summary's row of one patch."""
    return next(r for r in result["groups"] if r["name"] == name)
