"""Hermetic tests of `apply.py test` (moepatch.testing), moepatch.precompiled and
the fatbin trimming of ci/device_bundle.py: a tiny fake vLLM tree with a few
pytest files, a fake series, a fake wheel and a synthetic ELF."""

import importlib.util
import json
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from moepatch import precompiled, testing
from moepatch.errors import ToolError

REPO = Path(__file__).resolve().parent.parent

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
# pytest that does not react to SIGINT (a SIGINT lost while it starts, or one
# that a library swallows): only SIGTERM/SIGKILL after the grace stops it
IGNORE_SIGINT = "import signal\n\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
# a start-up that outlasts the limit: conftest.py is imported before collection
SLOW_START = "import time\n\ntime.sleep(600)\n"
# how long a stopped run may take past its limit (grace + start/stop under load)
STOP_SLACK_S = 25


def _patch_text(name: str, tests: list[str]) -> str:
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


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def fake(tmp_path: Path):
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
    _git(tree, "init", "-q", "-b", "patched")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "base")
    _git(tree, "tag", "vllm-base")
    new = tree / "tests/kernels/test_new.py"  # the patch's own new test
    new.write_text("def test_new():\n    assert True\n")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "patch")

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
        (patches / name).write_text(_patch_text(name, tests))
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


def _run(fake, tmp_path, *argv: str) -> tuple[int, dict, str]:
    tree, patches = fake
    out = tmp_path / "result.json"
    junit = tmp_path / "result.xml"
    rc = testing.main(
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


def _row(result: dict, name: str) -> dict:
    return next(r for r in result["groups"] if r["name"] == name)


def test_table_counts_reasons_and_red(fake, tmp_path, capsys):
    rc, result, junit = _run(fake, tmp_path, "--patch", "one.patch")
    assert rc == 1  # a red test is red
    row = _row(result, "one.patch")
    assert row["collected"] == 8  # 6 in test_a + test_one + test_two (from tests.toml)
    assert (row["passed"], row["failed"], row["skipped"], row["xfailed"]) == (
        5,
        1,
        1,
        1,
    )
    assert row["skip_reasons"] == {"needs a GPU we do not have": 1}
    assert row["failures"][0]["nodeid"] == "tests/kernels/test_a.py::test_fail"
    assert "one is not two" in row["failures"][0]["message"]
    assert result["nodes"]["tests/kernels/test_a.py::test_param[1]"] == "passed"
    assert 'name="test_fail"' in junit and "<failure" in junit
    table = capsys.readouterr().out
    assert "FAILED tests/kernels/test_a.py::test_fail" in table
    assert "skipped     1 x needs a GPU we do not have" in table
    assert "verdict: RED" in table


def test_skips_never_count_as_passes(fake, tmp_path):
    rc, result, _ = _run(fake, tmp_path, "--patch", "skips.patch")
    row = _row(result, "skips.patch")
    assert (row["passed"], row["skipped"]) == (0, 1)
    assert row["skip_reasons"] == {"CUDA only": 1}
    assert rc == 0  # nothing red; the skip is reported, not hidden


def test_shared_tests_run_once_and_count_in_each_row(fake, tmp_path):
    rc, result, _ = _run(fake, tmp_path, "--patch", "one", "--patch", "two", "-k", "not fail")
    assert rc == 0
    assert _row(result, "two.patch")["passed"] == 3  # test_b x2 + test_new
    # -k "not fail" drops test_fail and test_xfail
    assert _row(result, "one.patch")["collected"] == 6
    assert result["total"]["collected"] == 7  # each test once
    assert result["command"].count("tests/kernels/test_b.py") == 1


def test_exit_5_when_nothing_collected(fake, tmp_path, capsys):
    rc, result, _ = _run(fake, tmp_path, "--patch", "empty.patch")
    assert rc == testing.EXIT_EMPTY and result["pytest_exit"] == 5
    assert "EMPTY" in capsys.readouterr().out
    rc, result, _ = _run(fake, tmp_path, "--patch", "empty.patch", "--allow-empty")
    assert rc == 0


def test_excluded_file_is_not_run_and_says_why(fake, tmp_path):
    rc, result, _ = _run(fake, tmp_path, "--patch", "broken.patch")
    row = _row(result, "broken.patch")
    assert row["collected"] == 0 and row["passed"] == 0
    assert row["not_run"] == [
        {"test": "tests/kernels/test_broken.py", "reason": "imports a GPU-only module"}
    ]
    assert rc == testing.EXIT_EMPTY  # nothing ran: never a silent pass


def test_skip_test_leaves_a_named_file_out(fake, tmp_path):
    # The file a patch names explicitly is left out (pytest's --ignore would not
    # drop an explicitly named path) and reported as not run, with the reason.
    rc, result, _ = _run(
        fake, tmp_path, "--patch", "one.patch", "--skip-test", "tests/kernels/test_a.py"
    )
    row = _row(result, "one.patch")
    assert rc == 0 and row["collected"] == 2 and row["passed"] == 2
    assert {"test": "tests/kernels/test_a.py", "reason": "left out with --skip-test"} in row[
        "not_run"
    ]


def test_dist_init_tests_outside_kernels_moe_start_clean(fake, tmp_path):
    # A tests/kernels/moe test that leaves the model-parallel state up (that
    # directory turns per-test cleanup off) must not fail a later `dist_init`
    # test of another directory in the same pytest session.
    tree, _ = fake
    files = {
        "vllm/distributed/__init__.py": (
            "STATE = None\n\n"
            "def cleanup_dist_env_and_memory():\n"
            "    global STATE\n"
            "    STATE = None\n"
        ),
        "tests/kernels/moe/__init__.py": "",
        "tests/kernels/moe/test_leaves_state.py": (
            "import vllm.distributed as d\n\ndef test_leaves_state():\n    d.STATE = 'up'\n"
        ),
        "tests/layers/__init__.py": "",
        "tests/layers/test_uses_dist.py": (
            "import pytest\nimport vllm.distributed as d\n\n"
            "@pytest.fixture\ndef dist_init():\n"
            "    assert d.STATE is None, 'already initialized'\n"
            "    d.STATE = 'up'\n    yield\n    d.STATE = None\n\n"
            "def test_uses_dist(dist_init):\n    pass\n"
        ),
    }
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    rc, result, _ = _run(
        fake,
        tmp_path,
        "--patch",
        "two.patch",
        "--test",
        "tests/kernels/moe/test_leaves_state.py",
        "--test",
        "tests/layers/test_uses_dist.py",
    )
    assert result["nodes"]["tests/kernels/moe/test_leaves_state.py::test_leaves_state"] == "passed"
    assert result["nodes"]["tests/layers/test_uses_dist.py::test_uses_dist"] == "passed"
    assert rc == 0


def test_collection_error_is_red(fake, tmp_path):
    # on cuda the exclusion does not apply: the import error must show as red
    rc, result, _ = _run(
        fake,
        tmp_path,
        "--patch",
        "broken.patch",
        "--device",
        "cuda",
        "--precompiled",
        "none",
    )
    assert rc == 1
    errs = _row(result, "broken.patch")["collect_errors"]
    assert errs and "does_not_exist_anywhere" in errs[0]["message"]


def test_missing_test_file_is_reported(fake, tmp_path):
    _, result, _ = _run(fake, tmp_path, "--patch", "gone.patch")
    row = _row(result, "gone.patch")
    assert row["passed"] == 2
    assert row["not_run"][0]["test"] == "tests/kernels/test_missing.py"
    assert "not in this tree" in row["not_run"][0]["reason"]


@pytest.mark.parametrize("sigint", ["honoured", "ignored"])
def test_time_limit_interrupts_and_keeps_partial_results(fake, tmp_path, sigint):
    tree, _ = fake
    if sigint == "ignored":
        (tree / "conftest.py").write_text(IGNORE_SIGINT)
    t0 = time.monotonic()
    rc, result, junit = _run(fake, tmp_path, "--patch", "slow.patch", "--time-limit", "4")
    assert time.monotonic() - t0 < 4 + STOP_SLACK_S  # the limit holds
    assert rc == testing.EXIT_INTERRUPTED
    assert result["nodes"]["tests/kernels/test_slow.py::test_fast"] == "passed"
    # The test the limit cut off is unfinished, not red.
    assert result["nodes"]["tests/kernels/test_slow.py::test_slow"] == "unfinished"
    assert result["total"]["error"] == 0 and result["total"]["unfinished"] == 1
    assert "INTERRUPTED" in result["verdict"] and "1 of 2 tests reported" in result["verdict"]
    if sigint == "honoured":  # pytest stopped on ^C: its own reports are written
        assert 'name="test_fast"' in junit


@pytest.mark.parametrize("sigint", ["honoured", "ignored"])
def test_time_limit_during_pytest_start_up(fake, tmp_path, sigint):
    tree, _ = fake
    (tree / "conftest.py").write_text((IGNORE_SIGINT if sigint == "ignored" else "") + SLOW_START)
    t0 = time.monotonic()
    rc, result, _ = _run(fake, tmp_path, "--patch", "two.patch", "--time-limit", "2")
    assert time.monotonic() - t0 < 2 + STOP_SLACK_S
    assert rc == testing.EXIT_INTERRUPTED
    assert result["nodes"] == {} and result["collected_reported"] is None
    assert result["verdict"] == (
        "INTERRUPTED after the 2 s time limit, before pytest finished collecting (0 tests reported)"
    )


def test_time_limit_holds_when_sigint_is_ignored_by_the_caller(fake, tmp_path):
    # A job started in the background by a non-interactive shell inherits
    # SIGINT ignored, and so would pytest: the tool gives pytest the default.
    tree, patches = fake
    out, junit = tmp_path / "result.json", tmp_path / "result.xml"
    code = "import sys; from moepatch import testing; sys.exit(testing.main(sys.argv[1:]))"
    argv = ["--tree", str(tree), "--patches", str(patches), "--json", str(out)]
    argv += ["--junit", str(junit), "-q", "--patch", "slow.patch", "--time-limit", "4"]
    t0 = time.monotonic()
    rc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        check=False,
    ).returncode
    assert time.monotonic() - t0 < 4 + STOP_SLACK_S
    assert rc == testing.EXIT_INTERRUPTED
    assert json.loads(out.read_text())["total"]["unfinished"] == 1
    assert 'name="test_fast"' in junit.read_text()  # written by pytest on ^C


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_xdist_reports_each_test_once(fake, tmp_path):
    rc, result, _ = _run(fake, tmp_path, "--patch", "one.patch", "-n", "2")
    assert rc == 1
    row = _row(result, "one.patch")
    assert (row["collected"], row["passed"], row["failed"]) == (8, 5, 1)


def test_base_runs_in_a_temporary_worktree(fake, tmp_path):
    tree, _ = fake
    rc, result, _ = _run(fake, tmp_path, "--patch", "two.patch", "--base")
    assert rc == 0
    row = _row(result, "two.patch")
    assert row["passed"] == 2  # test_new.py does not exist on base
    assert any(n["test"] == "tests/kernels/test_new.py" for n in row["not_run"])
    assert result["rev"] == _git(tree, "rev-parse", "vllm-base").strip()
    assert _git(tree, "status", "--porcelain") == ""
    assert len(_git(tree, "worktree", "list").splitlines()) == 1


def test_all_moe_and_list(fake, tmp_path, capsys):
    tree, patches = fake
    rc = testing.main(["--tree", str(tree), "--patches", str(patches), "--all-moe", "--list"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "run      tests/kernels    # everything" in out
    assert "excluded tests/kernels/test_broken.py" in out


def test_unknown_patch_and_missing_tree(fake, tmp_path, capsys):
    tree, patches = fake
    assert (
        testing.main(["--tree", str(tree), "--patches", str(patches), "--patch", "nope"])
        == testing.TestSetupError.exit_code
    )
    assert "no patch 'nope'" in capsys.readouterr().err
    with pytest.raises(ToolError):
        testing.run(testing.argparse.Namespace(tree=tmp_path / "none"))


def test_selection_file_round_trip(fake, tmp_path):
    tree, patches = fake
    spec = testing.build_spec(patches, device="cuda")
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps(spec))
    rc = testing.main(
        [
            "--tree",
            str(tree),
            "--selection",
            str(sel),
            "--device",
            "cpu",
            "--patch",
            "broken.patch",
            "-q",
            "--allow-empty",
        ]
    )
    assert rc == 0  # cpu exclusions taken from the file's exclude_by_device


def test_compare_finds_regressions():
    base = {"nodes": {"a": "passed", "b": "failed", "c": "passed", "d": "passed"}}
    patched = {
        "nodes": {
            "a": "failed",
            "b": "failed",
            "c": "skipped",
            "d": "passed",
            "e": "error",
            "f": "unfinished",
        }
    }
    base["nodes"]["f"] = "passed"
    c = testing.compare(base, patched)
    assert c["regressions"] == ["a"]
    assert c["red_on_both"] == ["b"]
    assert c["passed_on_base_skipped_patched"] == ["c"]
    assert c["red_only_in_patched_new_tests"] == ["e"]
    assert c["passed_on_base_unfinished_patched"] == ["f"]


def test_no_torch_at_import():
    code = "import sys, moepatch.testing, moepatch.precompiled; print('torch' in sys.modules)"
    out = subprocess.run(
        [testing.sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------
# precompiled
# --------------------------------------------------------------------------


def _fake_wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / precompiled.wheel_filename("9.9.9")
    with zipfile.ZipFile(wheel, "w") as zf:
        for m in precompiled.DEFAULT_MODULES:
            zf.writestr(m, b"\x7fELF fake " + m.encode())
    return wheel


def test_place_modules_into_tree_keeps_it_clean(fake, tmp_path, monkeypatch):
    tree, _ = fake
    monkeypatch.setenv("VLLM_MOE_PATCHES_CACHE", str(tmp_path / "cache"))
    (tree / ".gitignore").write_text("")  # prove info/exclude does the work
    _git(tree, "commit", "-qam", "no ignore")
    placed = precompiled.place_modules(tree, "9.9.9", wheel=_fake_wheel(tmp_path))
    assert set(placed.copied) == set(precompiled.DEFAULT_MODULES)
    for m in precompiled.DEFAULT_MODULES:
        assert (tree / m).read_bytes().startswith(b"\x7fELF fake")
    assert _git(tree, "status", "--porcelain") == ""
    again = precompiled.place_modules(tree, "9.9.9", wheel=_fake_wheel(tmp_path))
    assert again.copied == ()
    exclude = (tree / ".git/info/exclude").read_text()
    assert exclude.count("/vllm/_moe_C_stable_libtorch.abi3.so") == 1


def test_place_modules_refuses_installed_vllm_and_wrong_wheel(tmp_path):
    site = tmp_path / "lib/python3.12/site-packages"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm/__init__.py").write_text("")
    with pytest.raises(precompiled.PrecompiledError, match="installed vLLM"):
        precompiled.place_modules(site, "9.9.9", wheel=_fake_wheel(tmp_path))
    other = tmp_path / "vllm-1.0-py3-none-any.whl"
    other.write_bytes(b"")
    with pytest.raises(precompiled.PrecompiledError, match="release wheel"):
        precompiled.fetch_wheel("9.9.9", other)


# --------------------------------------------------------------------------
# ci/device_bundle.py: fatbin trimming
# --------------------------------------------------------------------------


def _load_bundle_module():
    spec = importlib.util.spec_from_file_location("device_bundle", REPO / "ci/device_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    head = bytearray(64)
    struct.pack_into("<HHIQ", head, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", head, 28, arch)
    return bytes(head) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def _elf_with_section(name: str, content: bytes) -> bytearray:
    names = b"\0" + name.encode() + b"\0.shstrtab\0"
    data_off = 64
    str_off = data_off + len(content)
    sh_off = (str_off + len(names) + 7) // 8 * 8
    elf = bytearray(sh_off + 3 * 64)
    elf[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", elf, 0x28, sh_off)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 2)
    elf[data_off:str_off] = content
    elf[str_off : str_off + len(names)] = names
    struct.pack_into("<IIQQQQ", elf, sh_off + 64, 1, 1, 0, 0, data_off, len(content))
    struct.pack_into("<IIQQQQ", elf, sh_off + 128, 2 + len(name), 3, 0, 0, str_off, len(names))
    return elf


def test_strip_fatbin_keeps_sm90_or_newest_ptx():
    db = _load_bundle_module()
    c1 = _container(
        _entry(2, 80, b"A" * 16),
        _entry(2, 90, b"B" * 16),
        _entry(2, 100, b"C" * 16),
        _entry(1, 90, b"P" * 16),
    )
    c2 = _container(
        _entry(2, 100, b"D" * 16),
        _entry(1, 80, b"E" * 16),
        _entry(1, 75, b"F" * 16),
        _entry(1, 100, b"G" * 16),
    )
    c3 = _container(_entry(2, 120, b"H" * 16))
    elf = _elf_with_section(".nv_fatbin", c1 + c2 + c3)
    before = bytes(elf)
    stats = db.strip_fatbin(elf, 90)
    assert len(elf) == len(before)
    assert stats["containers"] == 3 and stats["ptx_fallback"] == 1 and stats["no_image"] == 1
    kept = {p for p in b"ABCDEFGHP" if bytes([p]) * 16 in elf}
    assert kept == set(b"BE")  # sm_90 cubin; compute_80 PTX where no sm_90 cubin
    # headers untouched: the layout parses the same
    assert [e[:5] for e in db.fatbin_entries(elf, *db.elf_section(elf, ".nv_fatbin"))] == [
        e[:5] for e in db.fatbin_entries(before, *db.elf_section(before, ".nv_fatbin"))
    ]


def test_device_requirements_never_carry_torch():
    db = _load_bundle_module()
    names = [r.split("==")[0].lower() for r in db.read_requirements()]
    assert names and not [n for n in names if n.startswith(db.FORBIDDEN_WHEELS)]
    assert len(names) == len(set(names))


def test_options_fit_apply_py_parser():
    """`apply.py test` = configure_parser + apply.py's common options, no clash."""
    cli = pytest.importorskip("moepatch.cli")
    parser = testing.argparse.ArgumentParser()
    testing.configure_parser(parser)
    if hasattr(cli, "_common"):
        cli._common(parser)
    args = parser.parse_args(["--patch", "x", "--device", "cuda", "-n", "8", "--junit", "j.xml"])
    assert args.patch == ["x"] and args.device == "cuda" and args.workers == "8"


def test_node_exclusions_use_exact_boundaries(fake, tmp_path):
    _, patches = fake
    (patches / "tests.toml").write_text(
        "[device.cpu]\nexclude = [\n"
        '  { test = "tests/kernels/test_a.py::test_param", reason = "needs CUDA ops" },\n'
        '  { test = "tests/kernels/test_a.py::test_pa", reason = "matches nothing" },\n'
        "]\n"
    )
    rc, result, _ = _run(fake, tmp_path, "--patch", "one.patch", "-k", "not fail")
    assert rc == 0
    nodes = result["nodes"]
    assert "tests/kernels/test_a.py::test_pass" in nodes
    assert not [n for n in nodes if "test_param" in n]
    reasons = {n["test"]: n["reason"] for n in _row(result, "one.patch")["not_run"]}
    assert reasons["tests/kernels/test_a.py::test_param"] == "needs CUDA ops"


def test_all_reported_but_pytest_hangs_at_exit_is_not_interrupted(fake, tmp_path):
    tree, _ = fake
    # a session-finish hang after every test reported (seen with xdist on the GPU)
    (tree / "conftest.py").write_text(
        "import time\n\ndef pytest_unconfigure(config):\n    time.sleep(30)\n"
    )
    rc, result, _ = _run(fake, tmp_path, "--test", "tests/kernels/test_b.py", "--time-limit", "6")
    assert rc == 0, result["verdict"]
    assert "did not exit" in result["verdict"]
    assert result["total"]["passed"] == 2


# --------------------------------------------------------------------------
# merge: one summary from a selection split over several runs
# --------------------------------------------------------------------------


def _chunk(fake, tmp_path, name: str, *argv: str) -> Path:
    """Run part of a selection; keep its summary as ``name``."""
    _run(fake, tmp_path, *argv)
    return (tmp_path / "result.json").rename(tmp_path / name)


def _merge(tmp_path, *inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / "merged.json"
    out.unlink(missing_ok=True)
    rc = testing.main(["merge", *map(str, inputs), "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.is_file() else {}


def _summary(
    nodes: dict[str, str],
    *,
    rev: str = "r1",
    device: str = "cuda",
    exit_code: int = 0,
    messages: dict[str, str] | None = None,
    skip_test: tuple[str, ...] = (),
    collected: int | None = None,
) -> dict:
    """A --json summary as run_pytest writes it, for one patch over tests/t.py."""
    group = testing.Group("p.patch", "[MoE] p", [testing.Selector("tests/t.py", "trailer")])
    recs = {
        k: {"outcome": v, "message": (messages or {}).get(k, ""), "duration": 0.0}
        for k, v in nodes.items()
    }
    excluded = [testing.Selector(t, "left out with --skip-test") for t in skip_test]
    counts = Counter(nodes.values())
    return {
        "tree": "/w/vllm",
        "rev": rev,
        "label": None,
        "device": device,
        "command": ["python", "-m", "pytest"],
        "pytest_exit": exit_code,
        "exit_code": exit_code,
        "verdict": "whatever",
        "duration_s": 10.0,
        "collected_reported": len(nodes) if collected is None else collected,
        "junit": None,
        "groups": testing.summarize([group], recs, [], [], excluded),
        "total": {
            "name": "total (each test once)",
            "collected": len(nodes),
            **{o: counts.get(o, 0) for o in testing.OUTCOMES},
            "collect_errors": [],
            "not_run": [{"test": e.test, "reason": e.reason} for e in excluded],
        },
        "nodes": nodes,
        "skip_messages": {
            k: testing._skip_reason(recs[k]["message"]) for k, v in nodes.items() if v == "skipped"
        },
    }


def _write(tmp_path: Path, name: str, summary: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(summary))
    return path


def test_merge_disjoint_chunks_is_the_whole_run(fake, tmp_path, capsys):
    sel = ("--patch", "one.patch", "-k", "not fail")
    whole = _chunk(fake, tmp_path, "whole.json", *sel)
    a = _chunk(fake, tmp_path, "a.json", *sel, "--skip-test", "tests/kernels/test_b.py")
    b = _chunk(fake, tmp_path, "b.json", *sel, "--skip-test", "tests/kernels/test_a.py")
    assert _row(json.loads(a.read_text()), "one.patch")["not_run"]
    capsys.readouterr()
    rc, merged = _merge(tmp_path, a, b, extra=("--table", str(tmp_path / "t.txt")))
    whole = json.loads(whole.read_text())
    assert rc == 0 and merged["verdict"].startswith("GREEN")
    assert merged["nodes"] == whole["nodes"] and len(merged["nodes"]) == 6
    row, full = _row(merged, "one.patch"), _row(whole, "one.patch")
    for key in ("collected", "passed", "skipped", "failed", "skip_reasons", "selectors"):
        assert row[key] == full[key], key
    assert row["not_run"] == [] and merged["total"]["not_run"] == []  # each ran somewhere
    assert merged["merged_from"] == [str(a), str(b)] and len(merged["command"]) == 2
    parts = [json.loads(p.read_text())["duration_s"] for p in (a, b)]
    assert merged["duration_s"] == round(sum(parts), 1)
    assert testing.compare(whole, merged)["regressions"] == []
    table = capsys.readouterr().out
    assert "skipped     1 x needs a GPU we do not have" in table
    assert (tmp_path / "t.txt").read_text() == table


def test_merge_red_chunk_stays_red(fake, tmp_path, capsys):
    green = _chunk(
        fake, tmp_path, "a.json", "--patch", "one.patch", "--skip-test", "tests/kernels/test_a.py"
    )
    red = _chunk(
        fake, tmp_path, "b.json", "--patch", "one.patch", "--skip-test", "tests/kernels/test_b.py"
    )
    assert json.loads(green.read_text())["exit_code"] == 0
    capsys.readouterr()
    for order in ((green, red), (red, green)):
        rc, merged = _merge(tmp_path, *order)
        assert rc == testing.EXIT_FAILED and merged["verdict"].startswith("RED")
        assert merged["nodes"]["tests/kernels/test_a.py::test_fail"] == "failed"
        row = _row(merged, "one.patch")
        assert (row["collected"], row["passed"], row["failed"], row["not_run"]) == (8, 5, 1, [])
        assert "FAILED tests/kernels/test_a.py::test_fail: " in capsys.readouterr().out


def test_merge_not_run_only_where_no_run_ran_it(tmp_path):
    a = _summary({"tests/t.py::x": "passed"}, skip_test=("tests/t.py::y", "tests/t.py::z"))
    b = _summary({"tests/t.py::y": "passed"}, skip_test=("tests/t.py::x", "tests/t.py::z"))
    merged = testing.merge([a, b], ["a", "b"])
    assert [n["test"] for n in _row(merged, "p.patch")["not_run"]] == ["tests/t.py::z"]
    assert [n["test"] for n in merged["total"]["not_run"]] == ["tests/t.py::z"]
    assert _row(merged, "p.patch")["passed"] == 2 and merged["exit_code"] == 0


def test_merge_unfinished_then_passed_is_passed(tmp_path):
    cut = _summary({"tests/t.py::a": "passed", "tests/t.py::slow": "unfinished"}, exit_code=2)
    again = _summary({"tests/t.py::slow": "passed"})
    for order in ((cut, again), (again, cut)):
        merged = testing.merge(list(order), ["1", "2"])
        assert merged["nodes"] == {"tests/t.py::a": "passed", "tests/t.py::slow": "passed"}
        assert merged["exit_code"] == testing.EXIT_OK and merged["verdict"].startswith("GREEN")
        assert merged["total"]["unfinished"] == 0 and merged["conflicts"] == []
    # still cut off after merging: interrupted, not green
    other = _summary({"tests/t.py::b": "passed"})
    merged = testing.merge([cut, other], ["cut.json", "other.json"])
    assert merged["exit_code"] == testing.EXIT_INTERRUPTED
    assert merged["verdict"].startswith("INTERRUPTED")


def test_merge_tests_an_interrupted_run_never_reached_are_not_green(tmp_path):
    cut = _summary({"tests/t.py::a": "passed"}, exit_code=2, collected=3)
    other = _summary({"tests/t.py::b": "passed"}, skip_test=("tests/t.py",))
    merged = testing.merge([cut, other], ["cut.json", "other.json"])
    assert merged["exit_code"] == testing.EXIT_INTERRUPTED
    assert "cut.json: 2 of 3 tests never reported" in merged["verdict"]
    rest = _summary({"tests/t.py::b": "passed", "tests/t.py::c": "passed"})
    assert testing.merge([cut, rest], ["cut.json", "rest.json"])["exit_code"] == 0


def test_merge_conflict_keeps_the_worse_and_says_so(tmp_path, capsys):
    ok = _summary({"tests/t.py::a": "passed", "tests/t.py::s": "skipped"})
    bad = _summary(
        {"tests/t.py::a": "failed", "tests/t.py::s": "skipped"},
        exit_code=1,
        messages={"tests/t.py::a": "AssertionError: boom", "tests/t.py::s": "Skipped: no GPU"},
    )
    paths = [_write(tmp_path, "ok.json", ok), _write(tmp_path, "bad.json", bad)]
    rc, merged = _merge(tmp_path, *paths, extra=("--label", "split"))
    assert rc == testing.EXIT_FAILED and merged["nodes"]["tests/t.py::a"] == "failed"
    assert merged["verdict"].startswith("RED") and "tests/t.py::a failed" in merged["verdict"]
    assert merged["conflicts"][0]["outcomes"] == [
        [str(paths[0]), "passed"],
        [str(paths[1]), "failed"],
    ]
    assert _row(merged, "p.patch")["skip_reasons"] == {"no GPU": 1}
    table = capsys.readouterr().out
    assert "FAILED tests/t.py::a: AssertionError: boom" in table and "(split)" in table
    assert testing.compare(ok, merged)["regressions"] == ["tests/t.py::a"]
    # a merged summary merges again
    again = testing.merge([merged, ok], ["m", "ok"])
    assert again["nodes"]["tests/t.py::a"] == "failed" and again["exit_code"] == 1


def test_merge_refuses_other_rev_or_device(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _summary({"tests/t.py::a": "passed"}))
    b = _write(tmp_path, "b.json", _summary({"tests/t.py::b": "passed"}, rev="r2"))
    c = _write(tmp_path, "c.json", _summary({"tests/t.py::b": "passed"}, device="cpu"))
    for other, key in ((b, "rev"), (c, "device")):
        rc, merged = _merge(tmp_path, a, other)
        err = capsys.readouterr().err
        assert rc == testing.TestSetupError.exit_code and merged == {}
        assert err.startswith(f"error: {other}: {key} ") and len(err.splitlines()) == 1
    (tmp_path / "junk.json").write_text("{}")
    assert _merge(tmp_path, a, tmp_path / "junk.json")[0] == testing.TestSetupError.exit_code
    assert "not a test summary" in capsys.readouterr().err
