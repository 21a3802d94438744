"""Builds that are killed, builds that share one cache, and failures of git.

Each run under test is a separate `apply.py` process. It is stopped or held at
a named step through moepatch.testseam (environment variables), never by a
timer, so these tests behave the same on a loaded machine.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from release_fixtures import project_argv

from moepatch import gitutil
from moepatch.cache import cache_root
from moepatch.ownership import marker_path
from moepatch.testseam import BARRIER_ENV, KILL_ENV

ROOT = Path(__file__).resolve().parent.parent


def apply_py(project, *rest, env=None, target=None, source=None, command="apply"):
    """Start `apply.py COMMAND` for the project as its own process."""
    options = {"target": target or project.target} if command != "check" else {}
    argv = project_argv(command, project.root, *rest, source=source, **options)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "apply.py"), *argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def killed_at(project, point, **kwargs) -> None:
    run = apply_py(project, env={KILL_ENV: point}, **kwargs)
    _, err = run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL, err


def leftovers(project) -> list[str]:
    """What a finished run must not leave: scratch in the cache, files beside the target."""
    scratch = cache_root() / "tmp"
    found = [str(p) for p in scratch.iterdir()] if scratch.is_dir() else []
    found += [str(p) for p in (cache_root() / "downloads").rglob("*.part-*")]
    found += [str(p) for p in project.target.parent.iterdir() if p != project.target]
    if marker_path(project.target).exists():
        found.append(str(marker_path(project.target)))
    return found


def subjects(target: Path) -> list[str]:
    return gitutil.out(target, "log", "--format=%s", "vllm-base..patched").splitlines()[::-1]


@pytest.fixture
def reference(project, two_patches, tmp_path):
    """The series built once, without interruption, in a cache of its own."""
    project.set_series(two_patches)
    target = tmp_path / "reference" / "vllm"
    run = apply_py(
        project,
        env={"VLLM_MOE_PATCHES_CACHE": str(tmp_path / "ref-cache")},
        target=target,
        source=project.tarball,
    )
    assert run.wait(timeout=300) == 0, run.stderr.read()
    return gitutil.rev(target, "patched")


@pytest.mark.parametrize("point", ["extract", "base-commit", "begin", "am", "record"])
def test_killed_first_build_is_finished_by_a_plain_rerun(project, reference, point):
    killed_at(project, point, source=project.tarball)
    assert project.run() == 0
    assert gitutil.rev(project.target, "patched") == reference
    assert gitutil.rev(project.target, "HEAD") == reference
    assert not gitutil.dirty_paths(project.target)
    assert leftovers(project) == []
    assert project.run("apply", "--json") == 0  # and the tree is now taken as built


def test_killed_rebuild_is_finished_by_a_plain_rerun(project, two_patches):
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"]})
    assert project.run() == 0
    project.set_series(two_patches)
    killed_at(project, "am", source=project.tarball)
    assert project.run() == 0
    assert subjects(project.target) == ["[MoE] Change line ten", "[Model] Double the gate"]
    assert not gitutil.dirty_paths(project.target)
    assert leftovers(project) == []
    # Taken back, the tree is the user's again: their work is refused, not rebuilt over.
    (project.target / "vllm/gate.py").write_text("local edit\n")
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"]})
    assert project.run() == 8
    assert (project.target / "vllm/gate.py").read_text() == "local edit\n"


def test_what_killed_git_commands_leave_is_cleared(project, reference):
    """A kill inside `git am` or a checkout: lock files, an unfinished am, untracked files."""
    killed_at(project, "am", source=project.tarball)
    git_dir = project.target / ".git"
    (git_dir / "index.lock").write_text("")
    (git_dir / "refs/heads/patched.lock").write_text("")
    (git_dir / "rebase-apply").mkdir()
    (git_dir / "rebase-apply" / "next").write_text("2\n")
    (project.target / "vllm/half_written.py").write_text("def half(\n")
    assert project.run() == 0
    assert gitutil.rev(project.target, "HEAD") == reference
    assert not gitutil.dirty_paths(project.target)
    assert not (git_dir / "rebase-apply").exists()


def test_killed_download_is_finished_by_a_plain_rerun(project, served_index):
    killed_at(project, "download", source="sdist")
    assert list((cache_root() / "downloads").rglob("*.part-*"))  # the kill left half a file
    assert project.run("apply", "--source", "sdist") == 0
    assert leftovers(project) == []


@pytest.mark.parametrize("runs", [2, 4])
def test_concurrent_builds_share_one_cold_cache(project, two_patches, served_index, tmp_path, runs):
    """Several runs reach the cold cache at the same moment, as CI jobs on one machine would."""
    project.set_series(two_patches)
    meet = f"resolve:{tmp_path / 'barrier'}:{runs}"
    targets = [project.target.parent / f"vllm-{i}" for i in range(runs)]
    started = [
        apply_py(project, env={BARRIER_ENV: meet}, target=t, source="sdist") for t in targets
    ]
    for run in started:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    heads = {gitutil.rev(t, "patched") for t in targets}
    assert len(heads) == 1 and None not in heads
    assert [p.name for p in (cache_root() / "base").iterdir()] == [f"sdist-{project.sha}"]
    assert len(list((cache_root() / "downloads").rglob("*.tar.gz"))) == 1
    assert not any((cache_root() / "tmp").iterdir())
    assert sorted(project.target.parent.iterdir()) == targets  # no lock files beside them


def test_second_run_on_a_target_being_built_is_refused(project, two_patches, tmp_path, capsys):
    project.set_series(two_patches)
    meet = tmp_path / "barrier"
    first = apply_py(project, env={BARRIER_ENV: f"am:{meet}:2"}, source=project.tarball)
    deadline = time.monotonic() + 300
    while not (meet.is_dir() and any(meet.iterdir())) and first.poll() is None:
        assert time.monotonic() < deadline, "the first run never reached its first patch"
        time.sleep(0.01)
    assert project.run() == 9  # while the first run holds the target
    assert "another apply.py run is building it" in capsys.readouterr().err
    (meet / "test").touch()  # let the first run go on
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert subjects(project.target) == ["[MoE] Change line ten", "[Model] Double the gate"]


def _delete_blobs(repo: Path) -> None:
    listing = gitutil.out(repo, "cat-file", "--batch-all-objects", "--batch-check")
    for line in listing.splitlines():
        sha, kind, _ = line.split()
        if kind == "blob":
            (repo / ".git/objects" / sha[:2] / sha[2:]).unlink()


def test_git_failure_is_one_line_with_its_own_exit_code(project, two_patches, capsys):
    """A damaged cached base: git's many lines of complaint become one, -v shows them."""
    project.set_series(two_patches)
    assert project.run() == 0
    _delete_blobs(cache_root() / "base" / f"sdist-{project.sha}")
    other = project.target.parent / "other"
    capsys.readouterr()
    assert project.run("apply", "--target", str(other), "-q") == 16
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: git fetch failed in {other}: fatal: ")
    assert project.run("apply", "--target", str(other), "-v") == 16
    verbose = capsys.readouterr().err
    assert verbose.count("\n") > 2 and "  fatal: " in verbose
    # The failed run left a tree of its own making: once the cache is repaired,
    # a plain run takes it back.
    shutil.rmtree(cache_root() / "base")
    assert project.run("apply", "--target", str(other)) == 0
    assert gitutil.rev(other, "patched") == gitutil.rev(project.target, "patched")


def test_killed_export_loses_no_file_name(project, two_patches):
    """Export replaces files one by one: a commit made by hand keeps its file's name on re-run."""
    project.set_series(two_patches)
    assert project.run() == 0
    # Rework the second patch by hand, as a user would: same subject, no trailer.
    gitutil.run(project.target, "reset", "-q", "--hard", "HEAD~1")
    (project.target / "vllm/gate.py").write_text("def gate(x):\n    return 4 * x\n")
    project.commit("[Model] Double the gate")
    killed_at(project, "export", command="export")
    assert project.run("export") == 0
    assert (project.patches / "series").read_text().split()[-2:] == [
        "line-ten.patch",
        "double-gate.patch",
    ]
    assert b"return 4 * x" in (project.patches / "double-gate.patch").read_bytes()
    assert not list(project.patches.glob(".*"))
    assert project.run("export", "--check") == 0


def test_cache_failure_is_one_line_with_its_own_exit_code(project, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VLLM_MOE_PATCHES_CACHE", str(blocker / "cache"))
    assert project.run("apply", "-q") == 17
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: cannot create cache directory {blocker / 'cache'}/locks: ")
    assert not project.target.exists()
