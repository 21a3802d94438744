"""apply.py rebase: hermetic tests on generated releases, plus one real rebase."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from release_fixtures import (
    BASE_FILES,
    GATE,
    MOE,
    STEP_12,
    edit,
    make_project,
    make_release,
    project_argv,
    sha256,
    snapshot,
)

from moepatch import cli, gitutil, index, rebase, rebase_state
from moepatch.errors import NetworkError
from moepatch.pin import load_pin
from moepatch.release import pin_for_version, version_of_tarball
from moepatch.series import read_series

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path):
    project, tarball = make_project(tmp_path)
    return project, tarball


def run(project: Path, tarball: Path, *args: str) -> int:
    work = project / "build" / "rebase"
    return cli.main(project_argv("rebase", project, *args, source=tarball, work=work))


def release(tmp_path, version, **changes) -> Path:
    files = dict(BASE_FILES)
    for path, text in changes.items():
        files[path.replace("__", "/").replace("_py", ".py")] = text
    return make_release(tmp_path / "releases", version, files)


def results(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


# ---------------------------------------------------------------- branches


def test_clean_rebase_writes_pin_patches_and_range_diff(project, tmp_path, capsys):
    project, tarball = project
    before = snapshot(project)
    new = make_release(
        tmp_path / "releases", "1.0.1", {**BASE_FILES, "README.md": "fake vLLM, newer\n"}
    )
    assert run(project, tarball, "--to", str(new)) == 0
    out = capsys.readouterr().out
    pin = load_pin(project / "vllm.pin")
    assert (pin.version, pin.tag, pin.sdist_sha256) == ("1.0.1", "v1.0.1", sha256(new))
    assert pin.sdist_filename == "vllm-1.0.1.tar.gz"
    for name in ("step-one.patch", "gate-scale.patch", "step-twelve.patch"):
        assert "clean" in out and name in out
        # identical file contents in both releases: the patches do not change
        assert (project / "patches" / name).read_bytes() == before[f"patches/{name}"]
    assert (project / "patches/series").read_bytes() == before["patches/series"]
    assert "range-diff" in out
    assert out.count(" = ") >= 3  # range-diff: each commit unchanged
    work = project / "build/rebase"
    assert not rebase_state.load_state(work) or rebase_state.load_state(work).phase == "done"


def test_default_relative_work_directory(project, tmp_path, monkeypatch, capsys):
    # git runs inside the work tree: the relative default must still work.
    project, tarball = project
    new = release(
        tmp_path, "1.1.0", vllm__moe_py=edit(MOE, "def step_2(x):", "def step_2(x):  # moved")
    )
    monkeypatch.chdir(project)
    argv = project_argv("rebase", Path("."), "--to", str(new), source=tarball)
    assert argv[argv.index("--pin") + 1] == "vllm.pin"  # relative, as typed in the checkout
    assert cli.main(argv) == 0
    assert "3-way" in capsys.readouterr().out
    assert load_pin(project / "vllm.pin").version == "1.1.0"


def test_three_way_is_reported_and_patch_refreshed(project, tmp_path, capsys):
    project, tarball = project
    moe = edit(MOE, "def step_2(x):", "def step_2(x):  # renamed soon")
    new = release(tmp_path, "1.1.0", vllm__moe_py=moe)
    assert run(project, tarball, "--to", str(new), "--json") == 0
    rows = {r["name"]: r["result"] for r in results(capsys)["patches"]}
    assert rows == {
        "step-one.patch": "3-way",
        "gate-scale.patch": "clean",
        "step-twelve.patch": "clean",
    }
    text = (project / "patches/step-one.patch").read_text()
    assert "def step_2(x):  # renamed soon" in text  # context refreshed
    assert "Patch-Filename" not in text


def gate_conflict(tmp_path) -> Path:
    return release(tmp_path, "1.2.0", vllm__gate_py=edit(GATE, "y = y * 1", "y = y * 3"))


def test_conflict_stops_with_files_and_next_steps(project, tmp_path, capsys):
    project, tarball = project
    before = snapshot(project)
    assert run(project, tarball, "--to", str(gate_conflict(tmp_path))) == 7
    err = capsys.readouterr().err
    assert "gate-scale.patch conflicts with vLLM 1.2.0" in err
    assert "vllm/gate.py" in err and "conflict hunk" in err
    assert "--continue" in err and "--skip" in err and "--abort" in err
    assert snapshot(project) == before  # nothing written yet
    state = rebase_state.load_state(project / "build/rebase")
    assert state.phase == "conflict" and state.current == "gate-scale.patch"


def test_continue_after_fixing(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, "--to", str(gate_conflict(tmp_path))) == 7
    work = project / "build/rebase"
    # --continue before fixing refuses
    assert run(project, tarball, "--continue") == 7
    assert "still unmerged" in capsys.readouterr().err
    (work / "vllm/gate.py").write_text(edit(GATE, "y = y * 1", "y = y * 6"))
    gitutil.run(work, "add", "vllm/gate.py")
    assert run(project, tarball, "--continue", "--json") == 0
    report = results(capsys)
    rows = {r["name"]: r["result"] for r in report["patches"]}
    assert rows["gate-scale.patch"] == "conflict-resolved"
    assert rows["step-twelve.patch"] == "clean"
    assert "y = y * 6" in (project / "patches/gate-scale.patch").read_text()
    assert "-    y = y * 3" in (project / "patches/gate-scale.patch").read_text()
    assert load_pin(project / "vllm.pin").version == "1.2.0"
    assert report["range_diff"].count("!") >= 1  # the changed patch shows up
    # the committer date equals the author date, as in apply
    log = gitutil.out(work, "log", "-1", "--format=%ad|%cd", "rebase/new~1")
    assert log.split("|")[0] == log.split("|")[1]


def test_skip_drops_the_conflicting_patch(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, "--to", str(gate_conflict(tmp_path))) == 7
    assert run(project, tarball, "--skip", "--json") == 0
    rows = {r["name"]: r["result"] for r in results(capsys)["patches"]}
    assert rows["gate-scale.patch"] == "dropped"
    names = [p.name for p in read_series(project / "patches")]
    assert names == ["step-one.patch", "step-twelve.patch"]
    assert not (project / "patches/gate-scale.patch").exists()


def test_abort_restores_everything_exactly(project, tmp_path, capsys):
    project, tarball = project
    # a built tree the user has: it must stay exactly as it is
    built = project / "build" / "vllm"
    assert (
        cli.main(
            [
                "apply",
                "--pin",
                str(project / "vllm.pin"),
                "--patches",
                str(project / "patches"),
                "--source",
                str(tarball),
                "--target",
                str(built),
            ]
        )
        == 0
    )
    head, status = gitutil.rev(built, "HEAD"), gitutil.dirty_paths(built)
    before = snapshot(project)
    assert run(project, tarball, "--to", str(gate_conflict(tmp_path))) == 7
    # even a half-written patches/ (e.g. a crash while finishing) is put back
    (project / "patches/series").write_text("garbage\n")
    (project / "patches/extra.patch").write_text("x")
    assert run(project, tarball, "--abort") == 0
    assert snapshot(project) == before
    assert not (project / "build/rebase").exists()
    assert gitutil.rev(built, "HEAD") == head and gitutil.dirty_paths(built) == status
    assert run(project, tarball, "--abort") == 1  # nothing left to abort
    assert "no rebase in progress" in capsys.readouterr().err


def test_upstreamed_is_reported_and_dropped_on_request(project, tmp_path, capsys):
    project, tarball = project
    new = release(tmp_path, "1.3.0", vllm__moe_py=MOE + STEP_12)
    assert run(project, tarball, "--to", str(new)) == 7
    err = capsys.readouterr().err
    assert "already contains step-twelve.patch (upstreamed)" in err
    assert "--drop step-twelve.patch" in err
    state = rebase_state.load_state(project / "build/rebase")
    assert state.phase == "decide"
    assert run(project, tarball, "--continue") == 7  # still undecided
    capsys.readouterr()
    assert run(project, tarball, "--continue", "--drop", "step-twelve.patch", "--json") == 0
    rows = {r["name"]: r["result"] for r in results(capsys)["patches"]}
    assert rows == {
        "step-one.patch": "clean",
        "gate-scale.patch": "clean",
        "step-twelve.patch": "upstreamed, dropped",
    }
    assert [p.name for p in read_series(project / "patches")] == [
        "step-one.patch",
        "gate-scale.patch",
    ]


def test_drop_up_front(project, tmp_path, capsys):
    project, tarball = project
    new = release(tmp_path, "1.0.2", README_md="other\n")
    assert run(project, tarball, "--to", str(new), "--drop", "gate-scale.patch", "--json") == 0
    rows = {r["name"]: r["result"] for r in results(capsys)["patches"]}
    assert rows["gate-scale.patch"] == "dropped"
    assert "gate-scale.patch" not in (project / "patches/series").read_text()


def test_interrupted_mid_way_then_rerun(project, tmp_path, capsys, monkeypatch):
    project, tarball = project
    moe = edit(MOE, "def step_2(x):", "def step_2(x):  # renamed soon")
    new = release(tmp_path, "1.1.0", vllm__moe_py=moe)
    # reference: an uninterrupted rebase of a copy of the project
    other = tmp_path / "other"
    shutil.copytree(project, other)
    assert run(other, tarball, "--to", str(new)) == 0
    capsys.readouterr()

    real = rebase.apply_mbox
    calls = []

    def killed_after_am(repo, mbox, keep_conflict=False):
        calls.append(mbox.name)
        outcome = real(repo, mbox, keep_conflict)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after git am, before the state is saved
        return outcome

    monkeypatch.setattr(rebase, "apply_mbox", killed_after_am)
    assert run(project, tarball, "--to", str(new)) == 130
    state = rebase_state.load_state(project / "build/rebase")
    assert [e.status for e in state.entries] == ["3-way", None, None]
    # a different target while one is in progress is refused
    assert run(project, tarball, "--to", str(tarball)) == 1
    assert "in progress" in capsys.readouterr().err
    monkeypatch.setattr(rebase, "apply_mbox", real)
    assert run(project, tarball, "--to", str(new)) == 0  # same command resumes
    assert snapshot(project) == snapshot(other)


def test_version_from_index_listing(project, tmp_path, capsys, monkeypatch):
    project, tarball = project
    new = release(tmp_path, "1.4.0", README_md="from the index\n")
    simple = tmp_path / "index" / "vllm"
    simple.mkdir(parents=True)
    listing = f'<a href="{new.as_uri()}#sha256={sha256(new)}">{new.name}</a>\n'
    (simple / "index.html").write_text(listing)
    monkeypatch.setattr(index, "index_urls", lambda: [(tmp_path / "index").as_uri()])
    assert run(project, tarball, "--to", "1.4.0") == 0
    pin = load_pin(project / "vllm.pin")
    assert (pin.version, pin.sdist_sha256) == ("1.4.0", sha256(new))
    assert pin.commit == version_of_tarball(new)[1][1:]


def test_version_hash_mismatch_on_index_is_refused(project, tmp_path, capsys, monkeypatch):
    project, tarball = project
    new = release(tmp_path, "1.5.0", README_md="tampered\n")
    simple = tmp_path / "index" / "vllm"
    simple.mkdir(parents=True)
    (simple / "index.html").write_text(
        f'<a href="{new.as_uri()}#sha256={"0" * 64}">{new.name}</a>\n'
    )
    monkeypatch.setattr(index, "index_urls", lambda: [(tmp_path / "index").as_uri()])
    before = snapshot(project)
    assert run(project, tarball, "--to", "1.5.0") == 5
    assert snapshot(project) == before
    assert not (project / "build/rebase").exists()


def test_series_broken_on_its_own_pin_is_reported(project, tmp_path, capsys):
    project, tarball = project
    other = release(tmp_path, "1.0.0x", vllm__gate_py="def gate(x):\n    return x\n")
    (project / "patches/series").write_text("gate-scale.patch\n")
    for patch in (project / "patches").glob("*.patch"):
        if patch.name != "gate-scale.patch":
            patch.unlink()
    # the pinned tarball is fine; break the patch instead
    p = project / "patches/gate-scale.patch"
    p.write_text(p.read_text().replace("y = y * 1", "y = y * 9"))
    assert run(project, tarball, "--to", str(other)) == 7
    assert "does not apply to its own pin" in capsys.readouterr().err


# ------------------------------------------------------------- integration


@pytest.mark.network
def test_real_series_rebases_from_0_33_to_0_32(tmp_path, monkeypatch, capsys):
    """The real series onto the real 0.32.0 sdist (network or user cache)."""
    monkeypatch.delenv("VLLM_MOE_PATCHES_CACHE")
    names = [p.name for p in read_series(REPO / "patches")]
    if not names:
        pytest.skip("patches/series is empty")
    try:
        pin32 = pin_for_version("0.32.0", load_pin(REPO / "vllm.pin"))
    except NetworkError as e:
        pytest.skip(f"package index unreachable: {e}")
    assert pin32.sdist_sha256 == (
        "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"
    )
    project = tmp_path / "project"
    shutil.copytree(REPO / "patches", project / "patches")
    shutil.copy2(REPO / "vllm.pin", project / "vllm.pin")
    work = project / "build/rebase"
    argv = project_argv("rebase", project, source="sdist", work=work)
    code = cli.main([*argv, "--to", "0.32.0", "--json"])
    out = capsys.readouterr()
    state = rebase_state.load_state(work)
    if code != 0:
        # a genuine cross-release conflict: the stop must be well formed
        assert code == 7, out.err
        assert state.phase in ("conflict", "decide")
        assert "--abort" in out.err
        assert cli.main([*argv, "--abort"]) == 0
        assert (project / "vllm.pin").read_bytes() == (REPO / "vllm.pin").read_bytes()
        return
    report = json.loads(out.out[out.out.index("{") :])
    assert report["to"] == "0.32.0"
    assert {r["name"] for r in report["patches"]} == set(names)
    assert load_pin(project / "vllm.pin").sdist_sha256 == pin32.sdist_sha256
    assert report["range_diff"].strip()
