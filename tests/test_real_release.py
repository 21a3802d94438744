"""The real series on the real vLLM release sdist from pip's configured index.

Slow-ish (one download of ~47 MB, cached in the user cache between runs) and
needs the index: when it cannot be reached the tests skip and say why.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moepatch import gitutil
from moepatch.errors import NetworkError
from moepatch.pin import load_pin
from moepatch.series import read_series
from moepatch.source import base_from_sdist, read_version_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pin = load_pin(ROOT / "vllm.pin")
    try:
        base = base_from_sdist(pin)
    except NetworkError as e:
        pytest.skip(f"package index unreachable: {e}")
    target = tmp_path_factory.mktemp("real") / "vllm"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "apply.py"),
            "apply",
            "--source",
            "sdist",
            "--target",
            str(target),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return pin, base, target, json.loads(result.stdout)


@pytest.fixture(autouse=True)
def isolated_cache():
    """Override the hermetic cache: the real sdist is cached across runs."""
    yield


def test_base_is_the_pinned_release(built):
    pin, base, target, _ = built
    version, commit = read_version_file(target)
    assert version == pin.version and pin.matches_commit(commit)
    assert gitutil.rev(target, "vllm-base") == base.commit
    # The base holds the release files vLLM's own .gitignore would hide.
    tracked = gitutil.out(target, "ls-files", "vllm/_version.py", "AGENTS.md")
    assert tracked.split() == ["AGENTS.md", "vllm/_version.py"]


def test_every_patch_is_one_commit(built):
    _, _, target, result = built
    patches = read_series(ROOT / "patches")
    assert [a["name"] for a in result["applied"]] == [p.name for p in patches]
    subjects = gitutil.out(target, "log", "--reverse", "--format=%s", "vllm-base..patched")
    assert subjects.splitlines() == [p.subject for p in patches]
    for entry in result["applied"]:
        assert gitutil.rev(target, entry["commit"]) == entry["commit"]


def test_export_reproduces_patches(built):
    _, _, target, _ = built
    result = subprocess.run(
        [sys.executable, str(ROOT / "apply.py"), "export", "--check", "--target", str(target)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_patched_tree_passes_its_cpu_tests(built, tmp_path):
    """`apply.py test --device cpu`: every patch's own and upstream tests that run on CPU."""
    _, _, target, _ = built
    summary = tmp_path / "cpu.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "apply.py"),
            "test",
            "--device",
            "cpu",
            "--tree",
            str(target),
            "--json",
            str(summary),
            "-n",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(summary.read_text())
    assert report["total"]["failed"] == 0 and report["total"]["error"] == 0
    rows = {row["name"]: row for row in report["groups"]}
    for patch in read_series(ROOT / "patches"):
        # Each patch's own tests ran here and passed (none is only skipped).
        assert rows[patch.name]["passed"] > 0, patch.name
