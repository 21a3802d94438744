"""ci/e2e_driver.py without a GPU: process order and budget, candidate patches,
data-parallel ranks and their environment, the NCCL loader fix, --against series."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ci"))

import bench_e2e  # noqa: E402
import e2e_driver  # noqa: E402
import e2e_models  # noqa: E402


def test_abba_alternates_trees_and_balances_them():
    assert e2e_driver.abba(3) == ["base", "patched", "patched", "base", "base", "patched"]
    order = e2e_driver.abba(4)
    assert order.count("base") == order.count("patched") == 4
    # every adjacent pair of processes holds one of each tree
    assert all({order[i], order[i + 1]} == {"base", "patched"} for i in range(0, 8, 2))


def test_schedule_runs_each_model_and_mode_in_abba_order():
    jobs = e2e_driver.schedule("a2.7b:2,30b-a3b", "graph,eager", procs=1, eager_procs=1)
    assert jobs == [
        ("a2.7b", "graph", 0, "base"),
        ("a2.7b", "graph", 1, "patched"),
        ("a2.7b", "graph", 2, "patched"),
        ("a2.7b", "graph", 3, "base"),
        ("a2.7b", "eager", 0, "base"),
        ("a2.7b", "eager", 1, "patched"),
        ("30b-a3b", "graph", 0, "base"),
        ("30b-a3b", "graph", 1, "patched"),
        ("30b-a3b", "eager", 0, "base"),
        ("30b-a3b", "eager", 1, "patched"),
    ]
    with pytest.raises(SystemExit, match="unknown model 'a2.7'"):
        e2e_driver.schedule("a2.7", "graph", 1, 1)
    # the device command refuses bad names before it unpacks anything
    with pytest.raises(SystemExit, match="--check: next"):
        bench_e2e.main(["device", "--bundle", "/nonexistent", "--out", "/tmp/x", "--check", "next"])


def test_candidate_patch_applies_to_the_patched_tree_or_stops(tmp_path):
    tree = tmp_path / "patched"
    tree.mkdir()
    (tree / "a.py").write_text("x = 1\n")
    good = tmp_path / "good.patch"
    good.write_text(
        "diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    )
    rec = e2e_driver.apply_candidate(good, tree)
    assert (tree / "a.py").read_text() == "x = 2\n"
    assert rec["patch"] == "good.patch" and len(rec["sha256"]) == 64
    # The same patch no longer applies: a clear stop naming it, tree unchanged.
    with pytest.raises(SystemExit, match="good.patch does not apply"):
        e2e_driver.apply_candidate(good, tree)
    assert (tree / "a.py").read_text() == "x = 2\n"
    raws = [{"applied": [rec]}, {"applied": [rec]}, {}]
    assert (
        bench_e2e.candidates(raws)
        == f"patched = the series + candidate good.patch ({rec['sha256'][:12]})\n\n"
    )
    assert bench_e2e.candidates([{}]) == ""


def test_device_stops_on_a_missing_candidate_before_unpacking(tmp_path):
    with pytest.raises(SystemExit, match="no candidate patch at"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--apply", "nope.patch"]
        )


@pytest.mark.parametrize("budget,refused", [("150", True), ("200", False)])
def test_device_refuses_a_budget_too_small_for_one_pair_before_unpacking(
    tmp_path, monkeypatch, budget, refused
):
    # No GPU time is spent unpacking a bundle for a run that could start nothing.
    unpacked = []

    def driver(args):
        unpacked.append(args.budget)
        raise SystemExit("unpacking")

    monkeypatch.setattr(bench_e2e, "Driver", driver)
    argv = ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--models", "a2.7b:1"]
    argv += ["--budget", budget, "--first-estimate", "100"]
    message = "cannot start one base/patched pair" if refused else "unpacking"
    with pytest.raises(SystemExit, match=message):
        bench_e2e.main(argv)
    assert unpacked == ([] if refused else [float(budget)])


def test_parallel_labels_and_rank_environment():
    assert e2e_driver.parallel_label(1, 1) == ""
    assert e2e_driver.parallel_label(2, 1) == " tp2"
    assert e2e_driver.parallel_label(1, 2) == " dp2ep"
    assert e2e_driver.parallel_label(2, 2) == " tp2 dp2ep"
    env = e2e_driver.rank_env(1, 2, 29500)
    assert env["VLLM_DP_RANK"] == env["VLLM_DP_RANK_LOCAL"] == "1"
    assert env["VLLM_DP_SIZE"] == "2" and env["VLLM_DP_MASTER_PORT"] == "29500"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def _driver(tmp_path, dp, rank_script):
    """A Driver without a bundle whose processes run ``rank_script``."""
    import argparse
    import subprocess

    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(dp=dp, budget=60)
    d.t0 = __import__("time").monotonic()
    d.envs = []

    def spawn(tree, cmd, extra_env=None):
        d.envs.append(extra_env or {})
        env = dict(__import__("os").environ, **(extra_env or {}))
        return subprocess.Popen([sys.executable, "-c", rank_script, cmd[-1]], env=env)

    d.spawn = spawn
    return d


def test_data_parallel_measurement_starts_one_process_per_rank(tmp_path):
    script = (
        "import json, os, sys\n"
        "rank = os.environ.get('VLLM_DP_RANK', '0')\n"
        "json.dump({'rank': rank, 'port': os.environ.get('VLLM_DP_MASTER_PORT')},"
        " open(sys.argv[1], 'w'))\n"
    )
    d = _driver(tmp_path, 2, script)
    started = d.start("base", ["child"], tmp_path / "time-0.json")
    assert [path.name for _, path in started] == ["time-0-rank0.json", "time-0-rank1.json"]
    rec = d.collect(started)
    assert rec["rank"] == "0" and "error" not in rec
    # both ranks share one master port
    assert d.envs[0]["VLLM_DP_MASTER_PORT"] == d.envs[1]["VLLM_DP_MASTER_PORT"] == rec["port"]
    one = _driver(tmp_path, 1, script)
    (only,) = one.start("base", ["child"], tmp_path / "time-1.json")
    assert only[1].name == "time-1.json" and one.envs == [{}]
    assert one.collect([only])["rank"] == "0"


def test_a_failed_rank_fails_the_measurement(tmp_path):
    script = (
        "import json, os, sys\n"
        "if os.environ['VLLM_DP_RANK'] == '1': sys.exit(3)\n"
        "json.dump({'rank': 0}, open(sys.argv[1], 'w'))\n"
    )
    d = _driver(tmp_path, 2, script)
    rec = d.collect(d.start("patched", ["child"], tmp_path / "check.json"))
    assert rec["error"] == "rank 1: process exited 3 without a result"


def test_device_refuses_profile_with_data_parallel(tmp_path):
    with pytest.raises(SystemExit, match="--profile needs one engine process"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--dp", "2", "--profile"]
        )


@pytest.mark.parametrize(
    "left,need,opens_pair,expected",
    [(100, 50, True, True), (99, 50, True, False), (50, 50, False, True), (49, 50, False, False)],
)
def test_a_process_that_opens_a_pair_needs_time_for_both(left, need, opens_pair, expected):
    assert e2e_driver.fits_budget(left, need, opens_pair) is expected


@pytest.mark.parametrize(
    "budget,trees",
    [
        (200, ["base", "patched", "patched", "base"]),
        (100, ["base", "patched"]),  # the second pair would not finish
        (90, []),  # not even one pair: nothing runs, rather than base alone
    ],
)
def test_time_models_starts_no_process_it_cannot_pair(tmp_path, monkeypatch, budget, trees):
    import argparse

    clock = [0.0]
    monkeypatch.setattr(e2e_driver.time, "monotonic", lambda: clock[0])
    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(
        models="a2.7b:2", modes="graph", procs=2, eager_procs=0, budget=budget,
        first_estimate=50, batches="1", eager_batches="1", reps=1, prefill_reps=1,
        profile=False, tp=1, dp=1,
    )  # fmt: skip
    d.t0, d.work, d.out, d.durations = 0.0, tmp_path, tmp_path, {}
    d.raw = {"records": [], "skipped": []}
    monkeypatch.setattr(e2e_models, "write_config", lambda *a: None)
    d.start = lambda tree, cmd, res: tree

    def collect(tree):
        clock[0] += 40  # every process takes 40 s
        return {}

    d.collect = collect
    d.time_models()
    assert [r["tree"] for r in d.raw["records"]] == trees
    assert len(d.raw["skipped"]) == 4 - len(trees)


def test_spawn_gives_a_rank_its_environment_over_the_engine_defaults(tmp_path, monkeypatch):
    """A data-parallel rank overrides VLLM_ENABLE_V1_MULTIPROCESSING, which the
    engine defaults also set; both must reach the child, the rank's winning.
    Each tree gets its own vLLM cache."""
    import argparse

    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = ('VLLM_ENABLE_V1_MULTIPROCESSING', 'VLLM_DP_RANK', 'NCCL_NVLS_ENABLE',"
        " 'PYTHONPATH', 'VLLM_CACHE_ROOT')\n"
        "json.dump({k: os.environ.get(k) for k in keys}, open(sys.argv[-1], 'w'))\n"
    )
    monkeypatch.setattr(e2e_driver, "CHILD_SCRIPT", script)
    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(dp=2, budget=60)
    d.out, d.work, d.site = tmp_path, tmp_path, tmp_path / "site"
    d.trees = {"base": tmp_path / "base"}
    d.t0 = __import__("time").monotonic()
    rec = d.collect(d.start("base", [], tmp_path / "env.json"))
    assert rec["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and rec["VLLM_DP_RANK"] == "0"
    assert rec["NCCL_NVLS_ENABLE"] == "0"
    assert rec["PYTHONPATH"].split(":") == [str(tmp_path / "base"), str(tmp_path / "site")]
    assert json.loads((tmp_path / "env-rank1.json").read_text())["VLLM_DP_RANK"] == "1"
    # each tree its own vLLM cache (the trees' model modules hash differently)
    d.trees["patched"] = tmp_path / "patched"
    other = d.collect(d.start("patched", [], tmp_path / "env2.json"))
    assert rec["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache" / "base")
    assert other["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache" / "patched")


@pytest.mark.parametrize("suspend,fixed", [(False, True), (True, False)])
def test_nccl_loader_fix_only_where_the_library_lacks_suspend(monkeypatch, suspend, fixed):
    import device_harness

    calls = []
    monkeypatch.setattr(
        device_harness, "nccl_library", lambda: {"version": "2.28.9", "suspend": suspend}
    )
    monkeypatch.setattr(device_harness, "skip_missing_nccl_suspend", calls.append)
    info = e2e_driver.nccl_for_all_to_all([Path("base"), Path("patched")])
    assert info["suspend_skipped"] is fixed
    assert calls == ([[Path("base"), Path("patched")]] if fixed else [])


def test_nccl_loader_fix_refuses_a_loader_it_does_not_know(tmp_path):
    import device_harness

    path = tmp_path / device_harness.NCCL_WRAPPER
    path.parent.mkdir(parents=True)
    path.write_text("class NCCLLibrary:\n    pass\n")
    with pytest.raises(RuntimeError, match="pynccl_wrapper.py: ncclCommSuspend branch not as"):
        device_harness.skip_missing_nccl_suspend([tmp_path])
    assert path.read_text() == "class NCCLLibrary:\n    pass\n"


def test_against_series_needs_a_candidate(tmp_path):
    with pytest.raises(SystemExit, match="--against series needs a candidate"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--against", "series"]
        )


def test_against_series_measures_the_candidate_on_top_of_the_series(tmp_path, monkeypatch):
    """base becomes a copy of the patched tree taken before the candidate applies."""
    import device_harness

    release, series = tmp_path / "u" / "base", tmp_path / "u" / "patched"
    for tree, text in ((release, "release\n"), (series, "series\n")):
        tree.mkdir(parents=True)
        (tree / "f.txt").write_text(text)
    monkeypatch.setattr(
        device_harness, "unpack_bundle", lambda bundle, work: (release, series, tmp_path, {})
    )
    monkeypatch.setattr(device_harness, "versions", dict)
    candidate = tmp_path / "c.patch"
    candidate.write_text("--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-series\n+series + candidate\n")
    import argparse

    ns = argparse.Namespace(
        bundle=str(tmp_path),
        out=str(tmp_path / "out"),
        apply=[str(candidate)],
        dp=1,
        against="series",
    )
    d = e2e_driver.Driver(ns)
    assert (d.trees["base"] / "f.txt").read_text() == "series\n"
    assert (d.trees["patched"] / "f.txt").read_text() == "series + candidate\n"
    assert d.raw["against"] == "series"
    (series / "f.txt").write_text("series\n")  # unpacked afresh, as on the device
    ns.against = "release"
    d = e2e_driver.Driver(ns)
    assert (d.trees["base"] / "f.txt").read_text() == "release\n"
    assert (d.trees["patched"] / "f.txt").read_text() == "series + candidate\n"
