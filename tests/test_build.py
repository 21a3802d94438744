"""apply / status / export / check on a small generated release."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from release_fixtures import RELEASE_FILES, make_patch, moe_with

from moepatch import gitutil
from moepatch.layout import FAILED_BRANCH
from moepatch.ownership import locked

ROOT = Path(__file__).resolve().parent.parent


def subjects(project) -> list[str]:
    return project.git("log", "--format=%s", "vllm-base..patched").splitlines()[::-1]


def test_apply_makes_one_commit_per_patch(project, two_patches):
    project.set_series(two_patches)
    assert project.run() == 0
    assert subjects(project) == ["[MoE] Change line ten", "[Model] Double the gate"]
    assert (project.target / "vllm/gate.py").read_text().endswith("return 2 * x\n")
    # The base is the release as shipped, files its own .gitignore hides included.
    assert "vllm/_version.py" in project.git("ls-tree", "-r", "--name-only", "vllm-base")
    assert project.git("rev-parse", "--abbrev-ref", "HEAD") == "patched"
    # Committer date = author date and a fixed identity: the SHAs repeat.
    assert project.git("log", "-1", "--format=%cn|%ad|%cd", "--date=iso-strict") == (
        "vllm-moe-patches|2026-11-25T12:00:00+00:00|2026-11-25T12:00:00+00:00"
    )


def test_build_is_reproducible(project, two_patches, tmp_path):
    project.set_series(two_patches)
    assert project.run() == 0
    other = tmp_path / "other"
    assert project.run("apply", "--target", str(other)) == 0
    assert gitutil.rev(other, "patched") == gitutil.rev(project.target, "patched")


def test_rerun_is_a_fast_noop(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    head = project.git("rev-parse", "HEAD")
    capsys.readouterr()
    start = time.monotonic()
    assert project.run("apply", "--json") == 0
    elapsed = time.monotonic() - start
    result = json.loads(capsys.readouterr().out)
    assert result["noop"] is True
    assert project.git("rev-parse", "HEAD") == head
    assert elapsed < 1.0


def test_series_change_rebuilds_from_base(project, two_patches):
    project.set_series(two_patches)
    assert project.run() == 0
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"]})
    assert project.run() == 0
    assert subjects(project) == ["[MoE] Change line ten"]
    assert "return x" in (project.target / "vllm/gate.py").read_text()


def test_conflict_names_patch_and_keeps_previous_build(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    good_head = project.git("rev-parse", "HEAD")
    clash = make_patch(
        RELEASE_FILES, {"vllm/moe.py": moe_with(10, "line TEN")}, "[MoE] Clash with line ten"
    )
    project.set_series({**two_patches, "clash.patch": clash})
    capsys.readouterr()
    assert project.run() == 7
    err = capsys.readouterr().err
    assert "patch clash.patch does not apply" in err
    assert "vllm/moe.py" in err
    assert "hint:" in err
    # The previous build is still checked out; the partial attempt is kept.
    assert project.git("rev-parse", "HEAD") == good_head
    assert project.git("rev-parse", "--abbrev-ref", "HEAD") == "patched"
    assert len(project.git("log", "--format=%s", f"vllm-base..{FAILED_BRANCH}").splitlines()) == 2
    assert not gitutil.dirty_paths(project.target)
    project.run("status")
    assert "failed   clash.patch" in capsys.readouterr().out


def test_first_build_conflict_leaves_last_good_patch(project, two_patches):
    clash = make_patch(
        RELEASE_FILES, {"vllm/moe.py": moe_with(10, "line TEN")}, "[MoE] Clash with line ten"
    )
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"], "clash.patch": clash})
    assert project.run() == 7
    assert project.git("rev-parse", "--abbrev-ref", "HEAD") == FAILED_BRANCH
    assert subjects_on(project, FAILED_BRANCH) == ["[MoE] Change line ten"]
    assert not gitutil.dirty_paths(project.target)


def test_fixing_a_failed_patch_as_the_hint_says(project, two_patches, capsys):
    """First build fails; fix the patch on moepatch/failed, export, apply again."""
    clash = make_patch(
        RELEASE_FILES, {"vllm/moe.py": moe_with(10, "line TEN")}, "[MoE] Clash with line ten"
    )
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"], "clash.patch": clash})
    assert project.run() == 7
    assert "git am -3 -k" in capsys.readouterr().err
    # What the user does by hand: resolve the clash (keep the patch's intent)
    # and commit with the patch's own message, no Patch-Filename trailer.
    status, _, _ = gitutil.run(
        project.target, "am", "-3", "-k", str(project.patches / "clash.patch"), check=False
    )
    assert status != 0
    (project.target / "vllm/moe.py").write_text(moe_with(10, "line TEN"))
    gitutil.run(project.target, "add", "vllm/moe.py")
    gitutil.run(project.target, "am", "--continue", env=gitutil.env_for(("Me", "me@x")))
    assert project.run("export") == 0
    # The fixed commit went back to its own file name, in series order.
    assert (project.patches / "series").read_text().split()[-2:] == [
        "line-ten.patch",
        "clash.patch",
    ]
    assert b"+line TEN" in (project.patches / "clash.patch").read_bytes()
    assert project.run() == 0
    assert subjects(project) == ["[MoE] Change line ten", "[MoE] Clash with line ten"]
    assert project.run("export", "--check") == 0


def test_a_patch_reapplied_by_hand_then_exported_is_taken_back(project, two_patches):
    """A patch file re-applied with `git am` has no Patch-Filename trailer;
    export keeps its file name by its subject, and so must the next apply."""
    project.set_series(two_patches)
    assert project.run() == 0
    gitutil.run(project.target, "reset", "-q", "--hard", "HEAD~1")
    gitutil.run(
        project.target,
        "am",
        "-q",
        "-k",
        str(project.patches / "double-gate.patch"),
        env=gitutil.env_for(("Me", "me@x")),
    )
    assert project.run("export") == 0
    assert sorted(p.name for p in project.patches.glob("*.patch")) == [
        "double-gate.patch",
        "line-ten.patch",
    ]
    assert project.run() == 0
    assert subjects(project) == ["[MoE] Change line ten", "[Model] Double the gate"]


def subjects_on(project, ref):
    return project.git("log", "--format=%s", f"vllm-base..{ref}").splitlines()[::-1]


def test_three_way_applies_patch_with_moved_context(project):
    # Made against a tree where moe.py had two extra lines at the top: plain
    # `git apply` fails on the offsets' context, the 3-way merge succeeds.
    shifted = {**RELEASE_FILES, "vllm/moe.py": "extra\nextra\n" + RELEASE_FILES["vllm/moe.py"]}
    edited = shifted["vllm/moe.py"].replace("line 20\n", "line twenty\n")
    patch = make_patch(shifted, {"vllm/moe.py": edited}, "[MoE] Change line twenty")
    project.set_series({"twenty.patch": patch})
    assert project.run() == 0
    assert "line twenty\n" in (project.target / "vllm/moe.py").read_text()


def test_dirty_tree_is_refused_then_kept_with_force(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    (project.target / "vllm/gate.py").write_text("local edit\n")
    (project.target / "notes.txt").write_text("mine\n")
    project.set_series({"line-ten.patch": two_patches["line-ten.patch"]})
    assert project.run() == 8
    assert "local work" in capsys.readouterr().err
    assert (project.target / "vllm/gate.py").read_text() == "local edit\n"
    assert project.run("apply", "--force") == 0
    refs = project.git("for-each-ref", "--format=%(refname)", "refs/moepatch/backup")
    assert refs.endswith("-worktree")
    saved = project.git("show", f"{refs}:vllm/gate.py")
    assert saved == "local edit"


def test_own_commits_are_refused_then_kept_with_force(project, two_patches):
    project.set_series(two_patches)
    assert project.run() == 0
    (project.target / "vllm/gate.py").write_text("mine\n")
    mine = project.commit("my work")
    assert project.run() == 8
    assert project.run("apply", "--force") == 0
    refs = project.git("for-each-ref", "--format=%(objectname)", "refs/moepatch/backup")
    assert mine in refs.splitlines()


def test_foreign_directory_is_refused_then_moved_aside(project):
    project.target.mkdir(parents=True)
    (project.target / "precious.txt").write_text("keep me\n")
    assert project.run() == 8
    assert (project.target / "precious.txt").exists()
    assert project.run("apply", "--force") == 0
    backups = list(project.target.parent.glob("vllm.backup-*"))
    assert len(backups) == 1 and (backups[0] / "precious.txt").read_text() == "keep me\n"


def test_second_run_on_locked_target_refuses(project, capsys):
    with locked(project.target):
        assert project.run() == 9
    assert "another apply.py run is building it" in capsys.readouterr().err
    assert project.run() == 0


def test_lock_is_released_by_a_dead_process(project):
    project.target.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_DIE, str(project.target)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert holder.stdout.readline() == b"locked\n"
    assert holder.wait() == -signal.SIGKILL
    assert project.run() == 0


# Takes the target's lock as apply.py does, says so, then dies without unlocking.
_HOLD_AND_DIE = """
import os, signal, sys
from moepatch.ownership import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_no_lock_file_is_left_anywhere_beside_the_target(project, two_patches):
    project.set_series(two_patches)
    assert project.run() == 0
    assert sorted(p.name for p in project.target.parent.iterdir()) == ["vllm"]
    assert not list(project.target.parent.parent.glob("**/*.lock"))
    assert project.run() == 0  # the no-op re-run takes the lock too
    assert sorted(p.name for p in project.target.parent.iterdir()) == ["vllm"]


def test_export_round_trips_byte_for_byte(project, two_patches):
    project.set_series(two_patches, comment="# Keep this comment.\n")
    before = {p.name: p.read_bytes() for p in project.patches.iterdir()}
    assert project.run() == 0
    assert project.run("export") == 0
    assert {p.name: p.read_bytes() for p in project.patches.iterdir()} == before
    assert project.run("export", "--check") == 0


def test_export_picks_up_a_new_commit_and_drops_removed_files(project, two_patches):
    project.set_series(two_patches)
    assert project.run() == 0
    (project.target / "vllm/gate.py").write_text("def gate(x):\n    return 3 * x\n")
    project.commit("[Model] Triple the gate")
    assert project.run("export", "--check") == 10
    assert project.run("export") == 0
    series = (project.patches / "series").read_text().split()
    assert series[-3:] == ["line-ten.patch", "double-gate.patch", "triple-the-gate.patch"]
    # The new commit is now the series: apply reproduces it.
    assert project.run() == 0


def test_check_passes_on_a_good_series(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run("check") == 0
    assert "2 patches lint clean" in capsys.readouterr().out
    assert not project.target.exists()  # check never touches the built tree


def test_check_reports_drift(project, two_patches, capsys):
    # A hand-made patch that applies but is not what export writes (short index).
    data = two_patches["line-ten.patch"]
    short = re.sub(
        rb"index ([0-9a-f]{7})[0-9a-f]{33}\.\.([0-9a-f]{7})[0-9a-f]{33}", rb"index \1..\2", data
    )
    assert short != data
    project.set_series({**two_patches, "line-ten.patch": short})
    assert project.run("check") == 10
    assert "patches/line-ten.patch: differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "series, files, message, code",
    [
        ("a.patch\n", {}, "listed in series but missing", 14),
        ("a.patch\na.patch\n", {"a.patch": None}, "listed twice", 13),
        ("a.patch\n", {"a.patch": b"just text\n"}, "not a git format-patch file", 15),
        ("", {"stray.patch": None}, "not listed in patches/series", 4),
        ("# none yet\n", {"stray.patch": None}, "series: lists no patches, but", 4),
        ("a.patch\n", {"a.patch": None, "stray.patch": None}, "stray.patch: not listed in", 4),
    ],
)
def test_bad_series_is_one_line_error(project, two_patches, capsys, series, files, message, code):
    for name, data in files.items():
        (project.patches / name).write_bytes(data or two_patches["line-ten.patch"])
    (project.patches / "series").write_text(series)
    # check lints the series in its own words; apply refuses it as well.
    command = "check" if message.startswith("not listed in patches/") else "apply"
    assert project.run(command) == code
    assert message in capsys.readouterr().err
    assert not project.target.exists()


def test_check_reports_header_problems(project, two_patches, capsys):
    bare = make_patch(
        RELEASE_FILES,
        {"vllm/moe.py": moe_with(10, "line ten")},
        "[MoE] No trailers",
        trailers="Status: shipped",
    )
    project.set_series({"bare.patch": bare})
    assert project.run("check") == 4
    err = capsys.readouterr().err
    assert "missing 'Upstream:' trailer" in err
    assert "unknown 'Status: shipped'" in err
    assert "no 'Tests:' trailer" in err


def test_check_reports_missing_test_path(project, capsys):
    patch = make_patch(
        RELEASE_FILES,
        {"vllm/moe.py": moe_with(10, "line ten")},
        "[MoE] Names a missing test",
        trailers="Upstream: not yet\nStatus: pending\nTests: tests/nope.py",
    )
    project.set_series({"p.patch": patch})
    assert project.run("check") == 4
    assert "'Tests: tests/nope.py' does not exist" in capsys.readouterr().err


def test_status_json(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run("status", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["built"] and [p["state"] for p in info["patches"]] == ["pending"] * 2
    assert project.run() == 0
    capsys.readouterr()
    assert project.run("status", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["up_to_date"] and [p["state"] for p in info["patches"]] == ["applied"] * 2
    assert info["patches"][0]["upstream"] == "not yet"
