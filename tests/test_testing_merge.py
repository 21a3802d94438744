"""`python -m moepatch.testing merge/compare`: one summary from a selection
split over several runs, and base vs patched."""

import json
from collections import Counter
from pathlib import Path

from fake_vllm import group_row, run_apply_test

from moepatch.errors import TestSetupError
from moepatch.testing import command, selection, summary
from moepatch.testing.merge import compare, merge


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
    c = compare(base, patched)
    assert c["regressions"] == ["a"]
    assert c["red_on_both"] == ["b"]
    assert c["passed_on_base_skipped_patched"] == ["c"]
    assert c["red_only_in_patched_new_tests"] == ["e"]
    assert c["passed_on_base_unfinished_patched"] == ["f"]


def _chunk(fake, tmp_path, name: str, *argv: str) -> Path:
    """Run part of a selection; keep its summary as ``name``."""
    run_apply_test(fake, tmp_path, *argv)
    return (tmp_path / "result.json").rename(tmp_path / name)


def _merge(tmp_path, *inputs: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    out = tmp_path / "merged.json"
    out.unlink(missing_ok=True)
    rc = command.main(["merge", *map(str, inputs), "--json", str(out), *extra])
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
    group = selection.Group("p.patch", "[MoE] p", [selection.Selector("tests/t.py", "trailer")])
    recs = {
        k: {"outcome": v, "message": (messages or {}).get(k, ""), "duration": 0.0}
        for k, v in nodes.items()
    }
    excluded = [selection.Selector(t, "left out with --skip-test") for t in skip_test]
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
        "groups": summary.summarize([group], recs, [], [], excluded),
        "total": {
            "name": "total (each test once)",
            "collected": len(nodes),
            **{o: counts.get(o, 0) for o in summary.OUTCOMES},
            "collect_errors": [],
            "not_run": [{"test": e.test, "reason": e.reason} for e in excluded],
        },
        "nodes": nodes,
        "skip_messages": {
            k: summary.skip_reason(recs[k]["message"]) for k, v in nodes.items() if v == "skipped"
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
    assert group_row(json.loads(a.read_text()), "one.patch")["not_run"]
    capsys.readouterr()
    rc, merged = _merge(tmp_path, a, b, extra=("--table", str(tmp_path / "t.txt")))
    whole = json.loads(whole.read_text())
    assert rc == 0 and merged["verdict"].startswith("GREEN")
    assert merged["nodes"] == whole["nodes"] and len(merged["nodes"]) == 6
    row, full = group_row(merged, "one.patch"), group_row(whole, "one.patch")
    for key in ("collected", "passed", "skipped", "failed", "skip_reasons", "selectors"):
        assert row[key] == full[key], key
    assert row["not_run"] == [] and merged["total"]["not_run"] == []  # each ran somewhere
    assert merged["merged_from"] == [str(a), str(b)] and len(merged["command"]) == 2
    parts = [json.loads(p.read_text())["duration_s"] for p in (a, b)]
    assert merged["duration_s"] == round(sum(parts), 1)
    assert compare(whole, merged)["regressions"] == []
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
        assert rc == summary.EXIT_FAILED and merged["verdict"].startswith("RED")
        assert merged["nodes"]["tests/kernels/test_a.py::test_fail"] == "failed"
        row = group_row(merged, "one.patch")
        assert (row["collected"], row["passed"], row["failed"], row["not_run"]) == (8, 5, 1, [])
        assert "FAILED tests/kernels/test_a.py::test_fail: " in capsys.readouterr().out


def test_merge_not_run_only_where_no_run_ran_it(tmp_path):
    a = _summary({"tests/t.py::x": "passed"}, skip_test=("tests/t.py::y", "tests/t.py::z"))
    b = _summary({"tests/t.py::y": "passed"}, skip_test=("tests/t.py::x", "tests/t.py::z"))
    merged = merge([a, b], ["a", "b"])
    assert [n["test"] for n in group_row(merged, "p.patch")["not_run"]] == ["tests/t.py::z"]
    assert [n["test"] for n in merged["total"]["not_run"]] == ["tests/t.py::z"]
    assert group_row(merged, "p.patch")["passed"] == 2 and merged["exit_code"] == 0


def test_merge_unfinished_then_passed_is_passed(tmp_path):
    cut = _summary({"tests/t.py::a": "passed", "tests/t.py::slow": "unfinished"}, exit_code=2)
    again = _summary({"tests/t.py::slow": "passed"})
    for order in ((cut, again), (again, cut)):
        merged = merge(list(order), ["1", "2"])
        assert merged["nodes"] == {"tests/t.py::a": "passed", "tests/t.py::slow": "passed"}
        assert merged["exit_code"] == summary.EXIT_OK and merged["verdict"].startswith("GREEN")
        assert merged["total"]["unfinished"] == 0 and merged["conflicts"] == []
    # still cut off after merging: interrupted, not green
    other = _summary({"tests/t.py::b": "passed"})
    merged = merge([cut, other], ["cut.json", "other.json"])
    assert merged["exit_code"] == summary.EXIT_INTERRUPTED
    assert merged["verdict"].startswith("INTERRUPTED")


def test_merge_tests_an_interrupted_run_never_reached_are_not_green(tmp_path):
    cut = _summary({"tests/t.py::a": "passed"}, exit_code=2, collected=3)
    other = _summary({"tests/t.py::b": "passed"}, skip_test=("tests/t.py",))
    merged = merge([cut, other], ["cut.json", "other.json"])
    assert merged["exit_code"] == summary.EXIT_INTERRUPTED
    assert "cut.json: 2 of 3 tests never reported" in merged["verdict"]
    rest = _summary({"tests/t.py::b": "passed", "tests/t.py::c": "passed"})
    assert merge([cut, rest], ["cut.json", "rest.json"])["exit_code"] == 0


def test_merge_conflict_keeps_the_worse_and_says_so(tmp_path, capsys):
    ok = _summary({"tests/t.py::a": "passed", "tests/t.py::s": "skipped"})
    bad = _summary(
        {"tests/t.py::a": "failed", "tests/t.py::s": "skipped"},
        exit_code=1,
        messages={"tests/t.py::a": "AssertionError: boom", "tests/t.py::s": "Skipped: no GPU"},
    )
    paths = [_write(tmp_path, "ok.json", ok), _write(tmp_path, "bad.json", bad)]
    rc, merged = _merge(tmp_path, *paths, extra=("--label", "split"))
    assert rc == summary.EXIT_FAILED and merged["nodes"]["tests/t.py::a"] == "failed"
    assert merged["verdict"].startswith("RED") and "tests/t.py::a failed" in merged["verdict"]
    assert merged["conflicts"][0]["outcomes"] == [
        [str(paths[0]), "passed"],
        [str(paths[1]), "failed"],
    ]
    assert group_row(merged, "p.patch")["skip_reasons"] == {"no GPU": 1}
    table = capsys.readouterr().out
    assert "FAILED tests/t.py::a: AssertionError: boom" in table and "(split)" in table
    assert compare(ok, merged)["regressions"] == ["tests/t.py::a"]
    # a merged summary merges again
    again = merge([merged, ok], ["m", "ok"])
    assert again["nodes"]["tests/t.py::a"] == "failed" and again["exit_code"] == 1


def test_merge_refuses_other_rev_or_device(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _summary({"tests/t.py::a": "passed"}))
    b = _write(tmp_path, "b.json", _summary({"tests/t.py::b": "passed"}, rev="r2"))
    c = _write(tmp_path, "c.json", _summary({"tests/t.py::b": "passed"}, device="cpu"))
    for other, key in ((b, "rev"), (c, "device")):
        rc, merged = _merge(tmp_path, a, other)
        err = capsys.readouterr().err
        assert rc == TestSetupError.exit_code and merged == {}
        assert err.startswith(f"error: {other}: {key} ") and len(err.splitlines()) == 1
    (tmp_path / "junk.json").write_text("{}")
    assert _merge(tmp_path, a, tmp_path / "junk.json")[0] == TestSetupError.exit_code
    assert "not a test summary" in capsys.readouterr().err
