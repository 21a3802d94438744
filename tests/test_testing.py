"""Hermetic tests of `apply.py test` (moepatch.testing), moepatch.precompiled and
the fatbin trimming of ci/device_bundle.py: a tiny fake vLLM tree with a few
pytest files (fake_vllm.py), a fake series, a fake wheel and a synthetic ELF."""

import argparse
import importlib.util
import json
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from fake_vllm import git, group_row, run_apply_test

from moepatch import precompiled
from moepatch.errors import TestSetupError, ToolError
from moepatch.testing import command, selection, summary

REPO = Path(__file__).resolve().parent.parent

# pytest that does not react to SIGINT (a SIGINT lost while it starts, or one
# that a library swallows): only SIGTERM/SIGKILL after the grace stops it
IGNORE_SIGINT = "import signal\n\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
# a start-up that outlasts the limit: conftest.py is imported before collection
SLOW_START = "import time\n\ntime.sleep(600)\n"
# long enough for pytest to start and run test_fast on a loaded 2-core machine
PARTIAL_LIMIT_S = 8
# how long a stopped run may take past its limit (grace + start/stop under load)
STOP_SLACK_S = 25


def test_table_counts_reasons_and_red(fake, tmp_path, capsys):
    rc, result, junit = run_apply_test(fake, tmp_path, "--patch", "one.patch")
    assert rc == 1  # a red test is red
    row = group_row(result, "one.patch")
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
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "skips.patch")
    row = group_row(result, "skips.patch")
    assert (row["passed"], row["skipped"]) == (0, 1)
    assert row["skip_reasons"] == {"CUDA only": 1}
    assert rc == 0  # nothing red; the skip is reported, not hidden


def test_shared_tests_run_once_and_count_in_each_row(fake, tmp_path):
    rc, result, _ = run_apply_test(
        fake, tmp_path, "--patch", "one", "--patch", "two", "-k", "not fail"
    )
    assert rc == 0
    assert group_row(result, "two.patch")["passed"] == 3  # test_b x2 + test_new
    # -k "not fail" drops test_fail and test_xfail
    assert group_row(result, "one.patch")["collected"] == 6
    assert result["total"]["collected"] == 7  # each test once
    assert result["command"].count("tests/kernels/test_b.py") == 1


def test_exit_5_when_nothing_collected(fake, tmp_path, capsys):
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "empty.patch")
    assert rc == summary.EXIT_EMPTY and result["pytest_exit"] == 5
    assert "EMPTY" in capsys.readouterr().out
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "empty.patch", "--allow-empty")
    assert rc == 0


def test_excluded_file_is_not_run_and_says_why(fake, tmp_path):
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "broken.patch")
    row = group_row(result, "broken.patch")
    assert row["collected"] == 0 and row["passed"] == 0
    assert row["not_run"] == [
        {"test": "tests/kernels/test_broken.py", "reason": "imports a GPU-only module"}
    ]
    assert rc == summary.EXIT_EMPTY  # nothing ran: never a silent pass


def test_skip_test_leaves_a_named_file_out(fake, tmp_path):
    # The file a patch names explicitly is left out (pytest's --ignore would not
    # drop an explicitly named path) and reported as not run, with the reason.
    rc, result, _ = run_apply_test(
        fake, tmp_path, "--patch", "one.patch", "--skip-test", "tests/kernels/test_a.py"
    )
    row = group_row(result, "one.patch")
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
    rc, result, _ = run_apply_test(
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
    rc, result, _ = run_apply_test(
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
    errs = group_row(result, "broken.patch")["collect_errors"]
    assert errs and "does_not_exist_anywhere" in errs[0]["message"]


def test_missing_test_file_is_reported(fake, tmp_path):
    _, result, _ = run_apply_test(fake, tmp_path, "--patch", "gone.patch")
    row = group_row(result, "gone.patch")
    assert row["passed"] == 2
    assert row["not_run"][0]["test"] == "tests/kernels/test_missing.py"
    assert "not in this tree" in row["not_run"][0]["reason"]


@pytest.mark.parametrize("sigint", ["honoured", "ignored"])
def test_time_limit_interrupts_and_keeps_partial_results(fake, tmp_path, sigint):
    tree, _ = fake
    if sigint == "ignored":
        (tree / "conftest.py").write_text(IGNORE_SIGINT)
    t0 = time.monotonic()
    rc, result, junit = run_apply_test(
        fake, tmp_path, "--patch", "slow.patch", "--time-limit", str(PARTIAL_LIMIT_S)
    )
    assert time.monotonic() - t0 < PARTIAL_LIMIT_S + STOP_SLACK_S  # the limit holds
    assert rc == summary.EXIT_INTERRUPTED
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
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "two.patch", "--time-limit", "2")
    assert time.monotonic() - t0 < 2 + STOP_SLACK_S
    assert rc == summary.EXIT_INTERRUPTED
    assert result["nodes"] == {} and result["collected_reported"] is None
    assert result["verdict"] == (
        "INTERRUPTED after the 2 s time limit, before pytest finished collecting (0 tests reported)"
    )


def test_time_limit_holds_when_sigint_is_ignored_by_the_caller(fake, tmp_path):
    # A job started in the background by a non-interactive shell inherits
    # SIGINT ignored, and so would pytest: the tool gives pytest the default.
    tree, patches = fake
    out, junit = tmp_path / "result.json", tmp_path / "result.xml"
    argv = ["--tree", str(tree), "--patches", str(patches), "--json", str(out)]
    argv += ["--junit", str(junit), "-q", "--patch", "slow.patch"]
    argv += ["--time-limit", str(PARTIAL_LIMIT_S)]
    t0 = time.monotonic()
    rc = subprocess.run(
        [sys.executable, "-m", "moepatch.testing", *argv],
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        check=False,
    ).returncode
    assert time.monotonic() - t0 < PARTIAL_LIMIT_S + STOP_SLACK_S
    assert rc == summary.EXIT_INTERRUPTED
    assert json.loads(out.read_text())["total"]["unfinished"] == 1
    assert 'name="test_fast"' in junit.read_text()  # written by pytest on ^C


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist")
def test_xdist_reports_each_test_once(fake, tmp_path):
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "one.patch", "-n", "2")
    assert rc == 1
    row = group_row(result, "one.patch")
    assert (row["collected"], row["passed"], row["failed"]) == (8, 5, 1)


def test_base_runs_in_a_temporary_worktree(fake, tmp_path):
    tree, _ = fake
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "two.patch", "--base")
    assert rc == 0
    row = group_row(result, "two.patch")
    assert row["passed"] == 2  # test_new.py does not exist on base
    assert any(n["test"] == "tests/kernels/test_new.py" for n in row["not_run"])
    assert result["rev"] == git(tree, "rev-parse", "vllm-base").strip()
    assert git(tree, "status", "--porcelain") == ""
    assert len(git(tree, "worktree", "list").splitlines()) == 1


def test_all_moe_and_list(fake, tmp_path, capsys):
    tree, patches = fake
    rc = command.main(["--tree", str(tree), "--patches", str(patches), "--all-moe", "--list"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "run      tests/kernels    # everything" in out
    assert "excluded tests/kernels/test_broken.py" in out


def test_unknown_patch_and_missing_tree(fake, tmp_path, capsys):
    tree, patches = fake
    assert (
        command.main(["--tree", str(tree), "--patches", str(patches), "--patch", "nope"])
        == TestSetupError.exit_code
    )
    assert "no patch 'nope'" in capsys.readouterr().err
    with pytest.raises(ToolError):
        command.run(argparse.Namespace(tree=tmp_path / "none"))


def test_selection_file_round_trip(fake, tmp_path):
    tree, patches = fake
    spec = selection.build_spec(patches, device="cuda")
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps(spec))
    rc = command.main(
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


def test_no_torch_at_import():
    code = (
        "import sys, moepatch.testing.command, moepatch.precompiled; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
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
    git(tree, "commit", "-qam", "no ignore")
    placed = precompiled.place_modules(tree, "9.9.9", wheel=_fake_wheel(tmp_path))
    assert set(placed.copied) == set(precompiled.DEFAULT_MODULES)
    for m in precompiled.DEFAULT_MODULES:
        assert (tree / m).read_bytes().startswith(b"\x7fELF fake")
    assert git(tree, "status", "--porcelain") == ""
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
    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
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
    rc, result, _ = run_apply_test(fake, tmp_path, "--patch", "one.patch", "-k", "not fail")
    assert rc == 0
    nodes = result["nodes"]
    assert "tests/kernels/test_a.py::test_pass" in nodes
    assert not [n for n in nodes if "test_param" in n]
    reasons = {n["test"]: n["reason"] for n in group_row(result, "one.patch")["not_run"]}
    assert reasons["tests/kernels/test_a.py::test_param"] == "needs CUDA ops"


def test_all_reported_but_pytest_hangs_at_exit_is_not_interrupted(fake, tmp_path):
    tree, _ = fake
    # a session-finish hang after every test reported (seen with xdist on the GPU)
    (tree / "conftest.py").write_text(
        "import time\n\ndef pytest_unconfigure(config):\n    time.sleep(30)\n"
    )
    rc, result, _ = run_apply_test(
        fake, tmp_path, "--test", "tests/kernels/test_b.py", "--time-limit", "6"
    )
    assert rc == 0, result["verdict"]
    assert "did not exit" in result["verdict"]
    assert result["total"]["passed"] == 2


def test_failure_message_keeps_how_far_a_tolerance_check_missed():
    spec = importlib.util.spec_from_file_location(
        "moepatch_plugin", REPO / "moepatch" / "testing" / "pytest_plugin.py"
    )
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)

    def report(message):
        crash = argparse.Namespace(message=message)
        return argparse.Namespace(passed=False, longrepr=argparse.Namespace(reprcrash=crash))

    close = (
        "AssertionError: Tensor-likes are not close!\n\n"
        "Mismatched elements: 6 / 131072 (0.0%)\n"
        "Greatest absolute difference: 0.044 at index (61, 239) (up to 0.03 allowed)\n"
        "Greatest relative difference: 0.51 at index (61, 239) (up to 0.03 allowed)\n"
        "\nThe failure occurred for item [0]"
    )
    assert plugin._message(report(close)) == (
        "AssertionError: Tensor-likes are not close! | Mismatched elements: 6 / 131072 (0.0%)"
        " | Greatest absolute difference: 0.044 at index (61, 239) (up to 0.03 allowed)"
        " | Greatest relative difference: 0.51 at index (61, 239) (up to 0.03 allowed)"
    )
    # other failures keep their first line only
    assert plugin._message(report("assert 1 == 2\n +  where 1 = f()")) == "assert 1 == 2"
    assert plugin._message(report("   ")) == ""


def test_working_tree_bytes_counts_what_a_device_call_carries(tmp_path):
    """Tracked and untracked files travel with a call; ignored ones do not."""
    mod = _load_bundle_module()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("build/\n")
    (tmp_path / "tracked.txt").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    (tmp_path / "untracked.txt").write_bytes(b"y" * 300)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "big.bin").write_bytes(b"z" * 100_000)
    assert mod.working_tree_bytes(tmp_path) == 1000 + 300 + len("build/\n")
    (tmp_path / "tracked.txt").unlink()  # deleted, not yet committed: nothing travels
    assert mod.working_tree_bytes(tmp_path) == 300 + len("build/\n")
