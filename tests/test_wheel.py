"""`apply.py wheel` on a fake release and its fake release wheel, served by a
file:// package index: the wheel installs with real installers, carries the
series and the label, repeats byte for byte, and every refusal is one line
with its exit code."""

import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from installer.sources import WheelFile
from release_fixtures import (
    COMPILED,
    RELEASE_FILES,
    VERSION,
    WHEEL_TAGS,
    make_patch,
    make_release_wheel,
    moe_with,
    project_argv,
    sha256,
)

from moepatch import wheel
from moepatch.cli import main

NEW_KERNEL = "def kernel(x):\n    return x\n"


@pytest.fixture
def series(project) -> dict[str, bytes]:
    """One patch: change vllm/moe.py, add a module, delete vllm/gate.py, change a test."""
    edits = {
        "vllm/moe.py": moe_with(10, "line ten, patched"),
        "vllm/kernels/new_kernel.py": NEW_KERNEL,
        "tests/test_moe.py": "def test_ok():\n    assert 1\n",
    }
    patch = make_patch(RELEASE_FILES, edits, "[MoE] A change", deleted=("vllm/gate.py",))
    patches = {"a-change.patch": patch}
    project.set_series(patches)
    return edits


def serve(root: Path, monkeypatch, release: Path, listed_sha: str | None = None) -> None:
    """A PEP 503 index at file://root/simple listing `release` (with `listed_sha`)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    (root / "files" / release.name).write_bytes(release.read_bytes())
    page = root / "simple" / "vllm" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    sha = listed_sha or sha256(release)
    page.write_text(f'<a href="../../files/{release.name}#sha256={sha}">{release.name}</a>\n')
    monkeypatch.setenv("PIP_INDEX_URL", (root / "simple").as_uri())
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")


@pytest.fixture
def release(tmp_path, monkeypatch) -> Path:
    path = make_release_wheel(tmp_path / "release")
    serve(tmp_path / "index", monkeypatch, path)
    return path


def run_wheel(project, out: Path, *rest: str) -> int:
    return main(project_argv("wheel", project.root, *rest, target=project.target, out=out))


def raw_member(path: Path, name: str) -> tuple[int, bytes]:
    """(compression method, compressed bytes) of one member, as stored."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        info = zf.getinfo(name)
        f.seek(info.header_offset + 26)
        skip = int.from_bytes(f.read(2), "little") + int.from_bytes(f.read(2), "little")
        f.seek(skip, os.SEEK_CUR)
        return info.compress_type, f.read(info.compress_size)


def test_wheel_installs_the_release_with_the_series_laid_over_it(
    project, series, release, tmp_path, capsys
):
    assert project.run("apply") == 0
    capsys.readouterr()
    out = tmp_path / "dist"
    assert run_wheel(project, out, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    state = json.loads((project.target / ".git/moepatch/state.json").read_text())
    version = f"{VERSION}+moe.{state['fingerprint'][:12]}"
    built = out / f"vllm-{version}-{WHEEL_TAGS}.whl"
    assert result["version"] == version and Path(result["wheel"]) == built
    assert sorted(out.iterdir()) == [built]  # no temporary file left behind
    assert (result["replaced"], result["added"], result["deleted"]) == (1, 1, 1)
    assert result["outside"] == ["tests/test_moe.py"]

    # RECORD as an installer checks it: every file listed, every hash and size right.
    with WheelFile.open(built) as wf:
        wf.validate_record()
        assert wf.dist_info_dir == f"vllm-{version}.dist-info"

    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    installed = subprocess.run([*pip, "--target", str(site), str(built)], capture_output=True)
    assert installed.returncode == 0, installed.stderr.decode()
    assert (site / "vllm/moe.py").read_text() == series["vllm/moe.py"]
    assert (site / "vllm/kernels/new_kernel.py").read_text() == NEW_KERNEL
    assert not (site / "vllm/gate.py").exists()
    assert not (site / "tests").exists()
    assert (site / COMPILED[0]).read_bytes() == COMPILED[1]
    assert os.access(site / COMPILED[0], os.X_OK)
    probe = (
        "import importlib.metadata as md, json, vllm._version as v\n"
        "print(json.dumps([v.__version__, list(v.__version_tuple__), v.__commit_id__,"
        " md.version('vllm'), md.requires('vllm')]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    shown = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [
        version,
        [9, 9, 9, f"moe.{state['fingerprint'][:12]}"],
        "gabcdef123",
        version,
        ["torch==2.13.0", "numpy"],  # the release's dependencies, untouched
    ]
    marker = json.loads((site / "vllm/_moepatch.json").read_text())
    assert marker["series_digest"] == state["fingerprint"]
    assert marker["pin"]["sdist_sha256"] == project.sha
    assert marker["release_wheel"] == {"filename": release.name, "sha256": sha256(release)}
    assert [p["name"] for p in marker["patches"]] == ["a-change.patch"]
    assert marker["tree"]["patched"] == project.git("rev-parse", "patched")

    # The compiled module travels as the release compressed it, not recompressed.
    method, data = raw_member(built, COMPILED[0])
    assert (method, data) == raw_member(release, COMPILED[0])
    assert data != zlib.compress(COMPILED[1])[2:-4]  # recompressing would have shown


def test_same_pin_and_series_give_the_same_bytes_offline(
    project, series, release, tmp_path, monkeypatch, capsys
):
    assert project.run("apply") == 0
    assert run_wheel(project, tmp_path / "one") == 0
    first = next((tmp_path / "one").glob("*.whl"))
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    dist_info = [n for n in names if ".dist-info/" in n]
    assert names == sorted(set(names) - set(dist_info)) + dist_info
    assert dist_info[-1].endswith("/RECORD")
    # Again, on a fresh tree, with the index gone: the cached release, the same bytes.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    other = project.target.parent / "other"
    assert project.run("apply", "--target", str(other)) == 0
    argv = project_argv("wheel", project.root, target=other, out=tmp_path / "two")
    assert main(argv) == 0
    assert (tmp_path / "two" / first.name).read_bytes() == first.read_bytes()
    assert "moe." in capsys.readouterr().out


def _one_line_error(capsys, *words: str) -> None:
    """One `error:` line naming `words`, after progress logging, followed by hints only."""
    lines = capsys.readouterr().err.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in lines[errors[0]] for w in words), lines
    assert all(line.startswith("hint: ") for line in lines[errors[0] + 1 :]), lines


def test_refuses_without_a_built_tree(project, series, release, tmp_path, capsys):
    assert run_wheel(project, tmp_path / "dist") == 20
    _one_line_error(capsys, str(project.target), "no built tree")
    assert not (tmp_path / "dist").exists()


def test_refuses_a_tree_that_is_not_the_build_of_patches(
    project, series, release, tmp_path, capsys
):
    assert project.run("apply") == 0
    capsys.readouterr()
    # patches/ changed since the build
    original = (project.patches / "a-change.patch").read_bytes()
    other = make_patch(RELEASE_FILES, {"vllm/moe.py": moe_with(3, "x")}, "[MoE] Other")
    project.set_series({"a-change.patch": other})
    assert run_wheel(project, tmp_path / "dist") == 10
    _one_line_error(capsys, "built from another vllm.pin or patches/")
    # a commit on `patched` that patches/ does not have
    project.set_series({"a-change.patch": original})
    (project.target / "vllm/moe.py").write_text("local\n")
    project.commit("local work")
    assert run_wheel(project, tmp_path / "dist") == 10
    _one_line_error(capsys, "has commits that are not in patches/")
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("path", ["csrc/moe/topk.cu", "CMakeLists.txt", "requirements/common.txt"])
def test_refuses_a_series_that_changes_compiled_sources_or_the_build(
    project, release, tmp_path, capsys, path
):
    fine = make_patch(RELEASE_FILES, {"vllm/moe.py": moe_with(3, "x")}, "[MoE] Fine")
    after = {**RELEASE_FILES, "vllm/moe.py": moe_with(3, "x")}
    native = make_patch(after, {path: "changed\n"}, "[Kernel] Native")
    project.set_series({"fine.patch": fine, "native.patch": native})
    assert project.run("apply") == 0
    capsys.readouterr()
    assert run_wheel(project, tmp_path / "dist") == 22
    _one_line_error(capsys, "patch native.patch changes", path)
    assert not (tmp_path / "dist").exists()


def test_refuses_a_release_wheel_that_fails_its_hash(
    project, series, tmp_path, monkeypatch, capsys
):
    release = make_release_wheel(tmp_path / "release")
    serve(tmp_path / "index", monkeypatch, release, listed_sha="0" * 64)
    assert project.run("apply") == 0
    capsys.readouterr()
    assert run_wheel(project, tmp_path / "dist") == 5
    _one_line_error(capsys, release.name, "sha256 mismatch")
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_refuses_when_the_index_is_unreachable_and_nothing_is_cached(
    project, series, tmp_path, monkeypatch, capsys
):
    assert project.run("apply") == 0
    capsys.readouterr()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert run_wheel(project, tmp_path / "dist") == 6
    _one_line_error(capsys, "cannot list vllm on the index")


@pytest.mark.parametrize("flaw", ["unshipped", "unrecorded"])
def test_refuses_a_release_wheel_it_cannot_use(
    project, series, tmp_path, monkeypatch, capsys, flaw
):
    if flaw == "unshipped":  # the series changes vllm/moe.py; this wheel lacks it
        files = {k: v for k, v in RELEASE_FILES.items() if k != "vllm/moe.py"}
        release = make_release_wheel(tmp_path / "release", files)
        words = ("vllm/moe.py", "not shipped")
    else:  # a member RECORD does not list
        release = make_release_wheel(tmp_path / "release")
        with zipfile.ZipFile(release, "a") as zf:
            zf.writestr("vllm/stray.py", "")
        words = ("vllm/stray.py", "not listed in RECORD")
    serve(tmp_path / "index", monkeypatch, release)
    assert project.run("apply") == 0
    capsys.readouterr()
    assert run_wheel(project, tmp_path / "dist") == 21
    _one_line_error(capsys, *words)
    assert not (tmp_path / "dist").exists()


def test_local_version_is_normalized():
    # An all-digit label loses its leading zero, as pip writes the version.
    assert wheel.local_version("0.33.0", "012345678901" + "f" * 52) == "0.33.0+moe.12345678901"
    assert wheel.local_version("1.0", "a" * 64) == "1.0+moe.aaaaaaaaaaaa"


def test_a_local_release_wheel_needs_no_index(project, series, tmp_path, monkeypatch, capsys):
    release = make_release_wheel(tmp_path / "release")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert project.run("apply") == 0
    assert run_wheel(project, tmp_path / "dist", "--wheel", str(release)) == 0
    assert len(list((tmp_path / "dist").glob(f"vllm-{VERSION}+moe.*.whl"))) == 1
    renamed = tmp_path / "vllm-9.9.8-cp38-abi3-manylinux_2_28_x86_64.whl"
    renamed.write_bytes(release.read_bytes())
    capsys.readouterr()
    assert run_wheel(project, tmp_path / "other", "--wheel", str(renamed)) == 21
    _one_line_error(capsys, "expected the release wheel")
