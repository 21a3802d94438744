"""The real series on the real vLLM release from pip's configured index.

Slow-ish (one download of the ~47 MB sdist and one of the ~336 MB wheel, both
cached in the user cache between runs) and needs the index: when it cannot be
reached the tests skip and say why.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moepatch import gitutil, precompiled
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


def test_nccl_loader_fix_changes_only_the_suspend_branch(built, tmp_path):
    """The GPU harness's fix for an NCCL without ncclCommSuspend (ci/device_harness.py)
    on the real release's loader: the branch skips the two functions on CUDA too,
    nothing else changes, and the module still parses."""
    import ast
    import difflib

    sys.path.insert(0, str(ROOT / "ci"))
    import device_harness

    _, _, target, _ = built
    copy = tmp_path / device_harness.NCCL_WRAPPER
    copy.parent.mkdir(parents=True)
    before = (target / device_harness.NCCL_WRAPPER).read_text()
    copy.write_text(before)
    device_harness.skip_missing_nccl_suspend([tmp_path])
    after = copy.read_text()
    ast.parse(after)
    changed = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == [
        "-                        if current_platform.is_rocm():",
        "-                            continue",
        "+                        continue",
    ]
    suspend = after.index('elif func.name in ("ncclCommSuspend", "ncclCommResume"):')
    skip = after.index("                        continue\n", suspend)
    assert skip < after.index("raise", suspend)


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, removed afterwards: the wheel and its installed files take ~1.2 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_patched_wheel_installs_with_the_series_and_the_label(built, scratch):
    """`apply.py wheel` on the real release wheel: installed with --no-deps into a
    fresh --target, `import vllm` runs the patched files and names the label."""
    pin, _, target, _ = built
    try:
        precompiled.fetch_wheel(pin.version)  # cached after the first run
    except NetworkError as e:
        pytest.skip(f"package index unreachable: {e}")
    out = scratch / "dist"
    command = [sys.executable, str(ROOT / "apply.py"), "wheel", "--target", str(target)]
    start = time.monotonic()
    result = subprocess.run([*command, "--out", str(out), "--json"], capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert seconds < 60, f"apply.py wheel took {seconds:.0f} s"
    built_wheel = json.loads(result.stdout)
    state = json.loads((target / ".git/moepatch/state.json").read_text())
    version = f"{pin.version}+moe.{state['fingerprint'][:12]}"
    assert built_wheel["version"] == version

    site = scratch / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile"]
    installed = subprocess.run(
        [*pip, "--target", str(site), built_wheel["wheel"]], capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    # Every file the series changes in the package is installed as the tree has it.
    changed = gitutil.out(target, "diff", "--name-only", "vllm-base", "patched", "--", "vllm")
    for path in changed.splitlines():
        assert (site / path).read_bytes() == gitutil.blob(target, f"patched:{path}"), path
    probe = (
        "import importlib.metadata as md, inspect, json, vllm\n"
        "from vllm.model_executor.layers.fused_moe import modular_kernel, shared_expert_gate\n"
        "print(json.dumps([vllm.__version__, md.version('vllm'), vllm.__file__,"
        " shared_expert_gate.__file__,"
        " hasattr(modular_kernel.FusedMoEExpertsModular, 'accepts_output_alias')]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "VLLM_TARGET_DEVICE": "cpu"}
    shown = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=scratch, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-4000:]
    label, metadata_version, init, gate, opt_in = json.loads(shown.stdout.splitlines()[-1])
    assert label == metadata_version == version
    assert Path(init).is_relative_to(site) and Path(gate).is_relative_to(site)
    assert opt_in  # moe-output-alias's FusedMoEExpertsModular.accepts_output_alias
