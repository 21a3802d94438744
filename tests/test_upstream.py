"""apply.py upstream: one patch as an upstream PR, on generated releases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from release_fixtures import (
    BASE_FILES,
    GATE,
    MOE,
    PATCH_A,
    PATCH_B,
    edit,
    make_release,
    make_series,
    message,
    pin_for,
    project_argv,
    snapshot,
)

from moepatch import cli, upstream
from moepatch.pin import write_pin

AGENTS = """\
# Agents

## 1. Contribution Policy

- PR descriptions for AI-assisted work **must** include:
    - Why this is not duplicating an existing PR.
    - Test commands run and results.
    - Clear statement that AI assistance was used.
- Other rule.
"""
MOE_A = PATCH_A[2]["vllm/moe.py"]
BENCH = (
    "Measured on H100 (E=8, topk=2, hidden 4096): 41.0 us -> 35.2 us,\n"
    "1.16x speedup with benchmarks/kernels/benchmark_x.py.\n"
)


@pytest.fixture
def project(tmp_path):
    files = {**BASE_FILES, "AGENTS.md": AGENTS}
    tarball = make_release(tmp_path / "releases", "1.0.0", files)
    project = tmp_path / "project"
    project.mkdir()
    write_pin(pin_for(tarball, "1.0.0"), project / "vllm.pin")
    make_series(
        project,
        files,
        [
            (PATCH_A[0], message(PATCH_A[1], extra="\n" + BENCH), PATCH_A[2]),
            (PATCH_B[0], message(PATCH_B[1]), PATCH_B[2]),
            (
                "step-one-more.patch",
                message("[MoE] Add zero to step one"),
                {"vllm/moe.py": edit(MOE_A, "return x + 1 + 1\n", "return x + 1 + 1 + 0\n")},
            ),
            (
                "bad-test.patch",
                message("[MoE] Break gate", tests="tests/test_gate.py"),
                {
                    "vllm/gate.py": edit(GATE, "y = y * 1", "y = y * 1"),
                    "tests/test_gate.py": "def test_gate():\n    assert 1 == 2\n",
                },
            ),
            ("bad-format.patch", message("[MoE] Ugly code"), {"vllm/ugly.py": "x=1\n"}),
        ],
    )
    return project, tarball


def run(project, tarball, tmp_path, *args) -> int:
    out = tmp_path / "out"
    return cli.main(project_argv("upstream", project, *args, source=tarball, out=out))


def test_clean_patch_gives_branch_patch_and_pr(project, tmp_path, capsys):
    project, tarball = project
    before = snapshot(project)
    assert run(project, tarball, tmp_path, "step-one") == 0
    out = capsys.readouterr().out
    assert "applies alone on vLLM 1.0.0 (clean)" in out
    assert "tests (CPU): GREEN" in out
    assert "ruff check --no-fix vllm/moe.py: clean" in out.replace("lint: ", "")
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["ok"] and report["tests"]["counts"]["passed"] == 1
    patch_files = sorted((tmp_path / "out").glob("0001-*.patch"))
    assert len(patch_files) == 1
    text = patch_files[0].read_text()
    for trailer in ("Upstream:", "Status:", "Tests:", "Related:", "Patch-Filename:"):
        assert trailer not in text
    assert "Signed-off-by: vllm-moe-patches" in text
    assert "Subject: [MoE] Double step one" in text
    pr = (tmp_path / "out/PR.md").read_text()
    assert "## Why this is not a duplicate" in pr
    assert "https://github.com/vllm-project/vllm/pull/12345" in pr
    assert "python -m pytest" in pr and "tests/test_moe.py" in pr
    assert "H100" in pr and "35.2 us" in pr  # benchmark numbers carried over
    assert "AI assistance was used" in pr
    assert "- [ ] Why this is not duplicating an existing PR." in pr  # AGENTS.md rules
    tree = tmp_path / "out/tree"
    from moepatch import gitutil

    log = gitutil.out(tree, "log", "--format=%s", "vllm-base..upstream/step-one")
    assert log == "[MoE] Double step one"
    assert snapshot(project) == before


def test_dependency_is_found_and_reported(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, tmp_path, "step-one-more.patch") == 7
    err = capsys.readouterr().err
    assert "does not apply alone on vLLM 1.0.0; it needs: step-one.patch" in err
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["depends_on"] == ["step-one.patch"]
    assert report["applies_alone"] == "conflict"


def test_failing_test_is_red(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, tmp_path, "bad-test") == 1
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["tests"]["counts"]["failed"] == 1 and not report["ok"]


def test_lint_failure_is_reported(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, tmp_path, "bad-format", "--no-tests") == 1
    out = capsys.readouterr().out
    assert "ruff format --check vllm/ugly.py: FAILED" in out.replace("lint: ", "")


def test_newer_base_and_upstreamed(project, tmp_path, capsys):
    project, tarball = project
    files = {
        **BASE_FILES,
        "AGENTS.md": AGENTS,
        "vllm/gate.py": PATCH_B[2]["vllm/gate.py"],
        "vllm/moe.py": edit(MOE, "def step_2(x):", "def step_2(x):  # newer"),
    }
    newer = make_release(tmp_path / "releases", "1.1.0", files)
    assert run(project, tarball, tmp_path, "step-one", "--base", str(newer)) == 0
    assert "applies alone on vLLM 1.1.0 (3-way)" in capsys.readouterr().out
    assert run(project, tarball, tmp_path, "gate-scale", "--base", str(newer)) == 1
    assert "already has this change (upstreamed)" in capsys.readouterr().err


def test_unknown_patch(project, tmp_path, capsys):
    project, tarball = project
    assert run(project, tarball, tmp_path, "nope") == 4
    assert "no patch 'nope'" in capsys.readouterr().err


def test_clean_message_keeps_sign_off():
    msg = (
        "[MoE] X\n\nBody.\n\nUpstream: not yet\nStatus: pending\n"
        "Related: https://x/1\nTests: t.py\nSigned-off-by: A <a@b>\n"
        "Patch-Filename: x.patch\n"
    )
    assert upstream.clean_message(msg) == "[MoE] X\n\nBody.\n\nSigned-off-by: A <a@b>\n"


def test_default_relative_output_directory(project, tmp_path, monkeypatch, capsys):
    # git runs inside the output tree: a relative default must still work.
    project, tarball = project
    monkeypatch.chdir(project)
    argv = project_argv("upstream", Path("."), "step-one", "--no-tests", source=tarball)
    assert argv[argv.index("--pin") + 1] == "vllm.pin"  # relative, as typed in the checkout
    assert cli.main(argv) == 0
    assert "applies alone on vLLM 1.0.0 (clean)" in capsys.readouterr().out
    assert (project / "build" / "upstream" / "step-one" / "PR.md").is_file()
