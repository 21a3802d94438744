"""What the tool refuses, and that refusing loses nothing: bad bytes in the
inputs, exports that would overwrite work, a pin that no longer names the
cached release, and the lock's edge cases."""

from pathlib import Path

import pytest
from release_fixtures import VERSION, pin_text

from moepatch import ownership
from moepatch.cli import main
from moepatch.errors import LockedError
from moepatch.ownership import locked


def _files(project) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(project.patches.iterdir())}


def _edit_subject(project, name: str) -> bytes:
    path = project.patches / name
    edited = path.read_bytes().replace(b"Subject: [", b"Subject: [Edited][", 1)
    assert edited != path.read_bytes()
    path.write_bytes(edited)
    return edited


def test_export_refuses_while_a_build_holds_the_target(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    before = _files(project)
    with locked(project.target):
        assert project.run("export") == 9
    assert "another apply.py run is building it" in capsys.readouterr().err
    assert _files(project) == before


def test_export_refuses_a_tree_whose_build_was_interrupted(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    before = _files(project)
    ownership.begin(project.target)  # what a killed build leaves
    assert project.run("export") == 8
    assert "interrupted" in capsys.readouterr().err
    assert _files(project) == before
    assert project.run() == 0  # the next build finishes it
    assert project.run("export") == 0
    assert _files(project) == before


def test_export_refuses_to_overwrite_edits_not_built_yet(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run() == 0
    edited = _edit_subject(project, "line-ten.patch")
    assert project.run("export") == 10
    assert "export would overwrite those edits" in capsys.readouterr().err
    assert (project.patches / "line-ten.patch").read_bytes() == edited
    # Built first, the edit is in the tree and export keeps it.
    assert project.run() == 0
    assert project.run("export") == 0
    assert (project.patches / "line-ten.patch").read_bytes() == edited
    # --force exports the tree over an edit.
    _edit_subject(project, "double-gate.patch")
    assert project.run("export", "--force") == 0
    assert project.run("export", "--check") == 0


def test_export_check_without_a_built_tree_is_one_line(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run("export", "--check") == 1
    assert "not a tree built by apply.py" in capsys.readouterr().err


def test_export_keeps_comments_anywhere_in_the_series(project, two_patches):
    project.set_series(two_patches)
    series = "# order\nline-ten.patch  # the first\n\n# then\ndouble-gate.patch\n"
    (project.patches / "series").write_text(series)
    assert project.run() == 0
    assert project.run("export") == 0
    assert (project.patches / "series").read_text() == series
    assert project.run("export", "--check") == 0


@pytest.mark.parametrize("command, code", [("apply", 15), ("check", 4)])
def test_a_patch_that_is_not_utf8_is_named_before_anything_is_built(
    project, two_patches, capsys, command, code
):
    data = two_patches["line-ten.patch"].replace(b"Why this", b"Why \xff this", 1)
    project.set_series({**two_patches, "line-ten.patch": data})
    assert project.run(command) == code
    err = capsys.readouterr().err
    assert "line-ten.patch: not UTF-8 text (byte " in err
    assert "Traceback" not in err
    assert not project.target.exists()


def test_series_and_pin_that_are_not_utf8_are_one_line_errors(project, two_patches, capsys):
    project.set_series(two_patches)
    series = project.patches / "series"
    series.write_bytes(series.read_bytes() + b"# caf\xe9\n")
    assert project.run() == 4
    assert "series: not UTF-8 text" in capsys.readouterr().err
    project.set_series(two_patches)
    project.pin.write_bytes(project.pin.read_bytes() + b"# caf\xe9\n")
    assert project.run() == 3
    assert "vllm.pin: not UTF-8 text" in capsys.readouterr().err
    assert not project.target.exists()


@pytest.mark.parametrize("where", ["everywhere", "in the diff"])
def test_crlf_line_endings_are_refused(project, two_patches, capsys, where):
    """`git am` would drop the carriage returns: the build would not be what
    the patch says."""
    data = two_patches["line-ten.patch"]
    if where == "everywhere":
        crlf, line = data.replace(b"\n", b"\r\n"), 1
    else:
        crlf = data.replace(b"+line ten\n", b"+line ten\r\n")
        line = data[: data.index(b"+line ten\n")].count(b"\n") + 1
    assert crlf != data
    project.set_series({"line-ten.patch": crlf})
    assert project.run() == 15
    assert f"line-ten.patch:{line}: CRLF line ending" in capsys.readouterr().err
    assert not project.target.exists()


def test_a_blank_status_is_a_header_problem(project, two_patches, capsys):
    blank = two_patches["line-ten.patch"].replace(b"Status: pending", b"Status:  ", 1)
    assert blank != two_patches["line-ten.patch"]
    project.set_series({"line-ten.patch": blank})
    assert project.run("check") == 4
    err = capsys.readouterr().err
    assert "unknown 'Status: '" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "version, commit", [("0.34.0", None), (None, "deadbeef0"), ("9.9.10", None)]
)
def test_a_cached_release_is_checked_against_the_pin_again(
    project, two_patches, capsys, version, commit
):
    project.set_series(two_patches)
    assert project.run() == 0  # the base is cached now
    pin = pin_text(
        project.sha, **{"version": version or VERSION} | ({"commit": commit} if commit else {})
    )
    project.pin.write_text(pin)
    assert project.run() == 5
    assert "the pin says" in capsys.readouterr().err


def test_a_refused_run_never_removes_the_target(tmp_path, monkeypatch):
    target = tmp_path / "vllm"
    with locked(target):
        # The refused run also found the target missing before it was made.
        monkeypatch.setattr(Path, "exists", lambda self: False)
        with pytest.raises(LockedError), locked(target):
            pass
        monkeypatch.undo()
        assert target.is_dir()
    assert not target.exists()  # the holder removes the empty one it made


def test_default_paths_are_beside_patches_wherever_the_command_runs(
    project, two_patches, tmp_path, monkeypatch, capsys
):
    project.set_series(two_patches)
    assert project.run() == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["status", "--pin", str(project.pin), "--patches", str(project.patches)]
    assert main(argv) == 0
    assert f"tree:   {project.target}, base" in capsys.readouterr().out
    assert not (elsewhere / "build").exists()


def test_quiet_prints_nothing_on_success(project, two_patches, capsys):
    project.set_series(two_patches)
    assert project.run("apply", "-q") == 0
    assert capsys.readouterr().out == ""
    assert project.run("apply", "-q", "--json") == 0
    assert '"ok": true' in capsys.readouterr().out
