"""apply.py matrix: patch x release table on generated releases."""

from __future__ import annotations

import json
from pathlib import Path

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

from moepatch import cli, index

REPO = Path(__file__).resolve().parent.parent


def releases(tmp_path) -> dict[str, Path]:
    where = tmp_path / "releases"
    moe_3way = edit(MOE, "def step_2(x):", "def step_2(x):  # renamed soon")
    return {
        "1.1.0": make_release(where, "1.1.0", {**BASE_FILES, "vllm/moe.py": moe_3way}),
        "1.2.0": make_release(
            where, "1.2.0", {**BASE_FILES, "vllm/gate.py": edit(GATE, "y = y * 1", "y = y * 3")}
        ),
        "1.3.0": make_release(where, "1.3.0", {**BASE_FILES, "vllm/moe.py": MOE + STEP_12}),
    }


def run(project, tarball, *args) -> int:
    return cli.main(project_argv("matrix", project, *args, source=tarball))


def test_every_verdict(tmp_path, capsys):
    project, tarball = make_project(tmp_path)
    rel = releases(tmp_path)
    before = snapshot(project)
    specs = ",".join(["1.0.0", *(str(p) for p in rel.values())])
    assert (
        run(project, tarball, "--releases", specs, "--json", "--write", str(tmp_path / "results"))
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in result["releases"]] == ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
    cells = {
        (name, v): (c["alone"], c["series"])
        for name, per in result["results"].items()
        for v, c in per.items()
    }
    assert cells[("step-one.patch", "1.0.0")] == ("clean", "clean")
    assert cells[("gate-scale.patch", "1.0.0")] == ("clean", "clean")
    assert cells[("step-twelve.patch", "1.0.0")] == ("clean", "clean")
    assert cells[("step-one.patch", "1.1.0")] == ("3-way", "3-way")
    assert cells[("gate-scale.patch", "1.2.0")] == ("conflict", "conflict")
    assert cells[("step-twelve.patch", "1.2.0")] == ("clean", "clean")
    assert cells[("step-twelve.patch", "1.3.0")][1] == "upstreamed"
    details = result["results"]["gate-scale.patch"]["1.2.0"]["details"]["series"]
    assert any("vllm/gate.py" in d for d in details)
    # the stored copy: stable (no timing), and a markdown table
    stored = json.loads((tmp_path / "results/matrix.json").read_text())
    assert "seconds" not in stored and stored["results"] == result["results"]
    md = (tmp_path / "results/matrix.md").read_text()
    assert "| `gate-scale.patch` | clean | clean | clean | clean |" not in md
    assert "| `step-one.patch` | clean | 3-way | clean | clean |" in md
    assert snapshot(project) == before  # a report never writes the project


def test_table_and_fast_rerun(tmp_path, capsys):
    project, tarball = make_project(tmp_path)
    rel = releases(tmp_path)
    assert run(project, tarball, "--releases", f"1.0.0,{rel['1.2.0']}") == 0
    out = capsys.readouterr().out
    assert "1.0.0 (pinned)" in out and "1.2.0" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("gate-scale.patch"))
    assert line.split()[1:] == ["clean", "conflict"]
    # the bases are cached: nothing is extracted again
    bases = sorted((tmp_path / "cache/base").iterdir())
    assert run(project, tarball, "--releases", f"1.0.0,{rel['1.2.0']}") == 0
    assert sorted((tmp_path / "cache/base").iterdir()) == bases


def test_default_releases_from_index_listing(tmp_path, capsys, monkeypatch):
    project, tarball = make_project(tmp_path)
    where = tmp_path / "releases"
    listed = [make_release(where, v, BASE_FILES) for v in ("0.9.0", "0.9.5", "0.10.0")]
    listed.append(tarball)
    links = (
        "".join(f'<a href="{p.as_uri()}#sha256={sha256(p)}">{p.name}</a>\n' for p in listed)
        + '<a href="x.whl">vllm-0.9.5-cp38-abi3-manylinux1_x86_64.whl</a>\n'
    )
    (tmp_path / "index/vllm").mkdir(parents=True)
    (tmp_path / "index/vllm/index.html").write_text(links)
    monkeypatch.setattr(index, "index_urls", lambda: [(tmp_path / "index").as_uri()])
    assert run(project, tarball, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in result["releases"]] == ["1.0.0", "0.10.0", "0.9.5"]
    # offline afterwards: the remembered listing and cached sources suffice
    monkeypatch.setattr(index, "index_urls", lambda: ["file:///nonexistent/index"])
    assert run(project, tarball, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["results"] == result["results"]


def test_empty_series_is_an_error(tmp_path, capsys):
    project, tarball = make_project(tmp_path)
    (project / "patches/series").write_text("# nothing\n")
    for patch in (project / "patches").glob("*.patch"):
        patch.unlink()
    assert run(project, tarball, "--releases", "1.0.0") == 1
    assert "lists no patches" in capsys.readouterr().err
