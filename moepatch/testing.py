"""``apply.py test``: run vLLM's upstream tests, and each patch's own, on a built tree.

Selection. Each patch names the tests that cover it in its ``Tests:`` trailers
(files or node ids of the pinned tree, its own new tests included);
``patches/tests.toml`` adds, with a reason each, tests a trailer does not name,
the ``--all-moe`` set, and per-device exclusions (files that cannot even be
imported on that device). A test named by several patches runs once and counts
in each patch's row.

Running. pytest runs inside the tree (``cwd`` = tree, tree first on
``PYTHONPATH``) with a small reporting plugin that records every test's
outcome and skip reason, plus a JUnit XML; a test that ``--time-limit`` cuts
off is "unfinished", not red. On ``--device cpu`` the tree is
imported with ``VLLM_TARGET_DEVICE=cpu`` and Triton kernels run under
``TRITON_INTERPRET=1``. On ``--device cuda`` the release wheel's compiled ops
are placed into the tree first (see ``moepatch/precompiled.py``).

Verdicts. A failed or erroring test is red, whoever wrote it. A skip is a
skip, reported with its reason, never a pass; an expected failure (xfail) is
shown apart. Exit status: 0 green; 1 a test failed or errored (or a selected
file could not be collected); 2 pytest was interrupted or hit the time limit;
3/4 pytest internal/usage error; 5 pytest collected nothing (its own code 5,
reported explicitly; ``--allow-empty`` turns it into 0); 20 the run cannot
start (no built tree, unknown patch).

Nothing heavy is imported at module import time: torch is only ever imported
by the pytest subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ToolError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TREE = Path("build/vllm")
TESTS_TOML = "tests.toml"
ALL_MOE = "all-moe"
PLUGIN_NAME = "_moepatch_pytest_report"
REPORT_ENV = "MOEPATCH_PYTEST_REPORT"
DESELECT_ENV = "MOEPATCH_PYTEST_DESELECT"

# How long pytest gets after each stop signal (SIGINT, SIGTERM) at --time-limit.
STOP_GRACE_S = 5.0

# Exit codes (pytest's own where they mean the same thing).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 2
EXIT_EMPTY = 5


class TestSetupError(ToolError):
    """The tests cannot be started: no tree, bad selection, unknown patch."""

    __test__ = False  # not a pytest class
    exit_code = 20


# --------------------------------------------------------------------------
# pytest plugin (written to a temp dir and loaded with -p in the subprocess)
# --------------------------------------------------------------------------

PLUGIN_SOURCE = r'''
"""Records each test report as one JSON line in $MOEPATCH_PYTEST_REPORT."""
import json
import os

import pytest

_path = os.environ.get("MOEPATCH_PYTEST_REPORT")
_config = None


def _write(record):
    if not _path or (_config is not None and hasattr(_config, "workerinput")):
        return  # xdist workers: the controller records what they report
    with open(_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _message(report):
    if report.passed:
        return ""
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    crash = getattr(getattr(lr, "reprcrash", None), "message", None)
    if crash:
        return crash.strip().splitlines()[0][:500] if crash.strip() else ""
    text = str(lr or "").strip().splitlines()
    return text[-1][:500] if text else ""


def pytest_configure(config):
    global _config
    _config = config


def _covered(nodeid, test):
    return nodeid == test or nodeid.startswith((test + "::", test + "["))


def pytest_collection_modifyitems(config, items):
    drop = json.loads(os.environ.get("MOEPATCH_PYTEST_DESELECT") or "[]")
    if not drop:
        return
    keep, gone = [], []
    for item in items:
        (gone if any(_covered(item.nodeid, t) for t in drop) else keep).append(item)
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep


def pytest_runtest_setup(item):
    # vLLM's CI runs each test directory as its own job; here several share a
    # worker. tests/kernels/moe turns per-test cleanup off and cleans on entry
    # only its own `dist_init` users, so a test there that leaves the
    # model-parallel groups up would fail the next `dist_init` test of another
    # directory. Give those the same clean entry.
    if "dist_init" in item.fixturenames and not item.nodeid.startswith("tests/kernels/moe/"):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):
        _write({"event": "collected", "count": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _write({"event": "collected", "count": len(ids), "worker": str(node.gateway.id)})


def pytest_collectreport(report):
    if report.failed:
        _write({"event": "collecterror", "nodeid": report.nodeid,
                "message": _message(report)})


def pytest_runtest_logreport(report):
    _write({
        "event": "test", "nodeid": report.nodeid, "when": report.when,
        "outcome": report.outcome, "wasxfail": hasattr(report, "wasxfail"),
        "message": _message(report), "duration": round(report.duration, 3),
    })
'''


# --------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------


@dataclass
class Selector:
    test: str  # path of a file/dir in the tree, or a node id (path::name...)
    reason: str

    @property
    def path(self) -> str:
        return self.test.split("::", 1)[0]

    def covers(self, nodeid: str) -> bool:
        t = self.test.rstrip("/")
        if nodeid == t or nodeid.startswith((t + "::", t + "[")):
            return True
        return "::" not in t and nodeid.startswith(t + "/")


@dataclass
class Group:
    name: str  # patch file name, or "all-moe"
    subject: str = ""
    selectors: list[Selector] = field(default_factory=list)


def _load_toml(path: Path) -> dict:
    import tomllib

    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TestSetupError(f"{path}: {e}") from None


def _selectors(items: list, where: str) -> list[Selector]:
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"test": item, "reason": ""}
        if not isinstance(item, dict) or not item.get("test"):
            raise TestSetupError(f"{where}: each entry needs 'test' (and 'reason')")
        out.append(Selector(str(item["test"]), str(item.get("reason", ""))))
    return out


def build_spec(patches_dir: Path, device: str = "cpu") -> dict:
    """Resolve the selection for ``device`` from patches/ (series + tests.toml).

    The result is JSON-able, so it can be shipped to a machine that has
    neither the series nor git (the GPU device bundle).
    """
    from .series import read_series

    patches_dir = Path(patches_dir)
    cfg = _load_toml(patches_dir / TESTS_TOML)
    extra = cfg.get("patch", {})
    groups = []
    series = read_series(patches_dir) if (patches_dir / "series").is_file() else []
    for p in series:
        sels = [
            Selector(t.strip(), f"Tests: trailer of {p.name}") for t in p.trailers.get("Tests", [])
        ]
        sels += _selectors(
            extra.get(p.name, {}).get("tests", []), f"{TESTS_TOML} [patch.{p.name!r}]"
        )
        groups.append(
            {
                "name": p.name,
                "subject": p.subject,
                "selectors": [s.__dict__ for s in sels],
            }
        )
    unknown = set(extra) - {p.name for p in series}
    if unknown:  # e.g. a patch not yet listed in series: say so, do not fail
        print(
            f"warning: {TESTS_TOML} names patches not in the series: {sorted(unknown)}",
            file=sys.stderr,
        )
    all_moe = _selectors(cfg.get(ALL_MOE, {}).get("tests", []), f"{TESTS_TOML} [{ALL_MOE}]")
    by_device = {
        dev: [
            s.__dict__
            for s in _selectors(
                cfg.get("device", {}).get(dev, {}).get("exclude", []),
                f"{TESTS_TOML} [device.{dev}]",
            )
        ]
        for dev in ("cpu", "cuda")
    }
    return {
        "device": device,
        "groups": groups,
        ALL_MOE: [s.__dict__ for s in all_moe],
        "exclude": by_device[device],
        "exclude_by_device": by_device,
    }


def select(
    spec: dict, patches: list[str] | None, all_moe: bool, tests: list[str] | None = None
) -> list[Group]:
    """The groups to run: the named patches (default all), plus all-moe if asked."""
    groups = {
        g["name"]: Group(g["name"], g.get("subject", ""), [Selector(**s) for s in g["selectors"]])
        for g in spec["groups"]
    }
    chosen: list[Group] = []
    if patches:
        for name in patches:
            match = groups.get(name) or groups.get(name + ".patch")
            if match is None:
                raise TestSetupError(
                    f"no patch {name!r} in the series (have: {', '.join(groups) or 'none'})"
                )
            if match not in chosen:
                chosen.append(match)
    elif not tests:
        chosen = list(groups.values())
    if tests:
        chosen.append(
            Group(
                "ad-hoc",
                "tests named with --test",
                [Selector(t, "named with --test") for t in tests],
            )
        )
    if all_moe:
        chosen.append(
            Group(
                ALL_MOE,
                "all upstream MoE kernel tests",
                [Selector(**s) for s in spec.get(ALL_MOE, [])],
            )
        )
    return chosen


def plan(tree: Path, groups: list[Group], exclude: list[Selector]):
    """Turn groups into pytest targets.

    Returns:
        (targets, absent, excluded): the minimal list of selectors to pass to
        pytest; selectors whose file is not in this tree; and the exclusions
        that touch the selection, as (selector, reason).
    """
    wanted: list[Selector] = []
    absent: list[Selector] = []
    for g in groups:
        for s in g.selectors:
            if not (tree / s.path).exists():
                if s.test not in [a.test for a in absent]:
                    absent.append(s)
            elif s.test not in [w.test for w in wanted]:
                wanted.append(s)
    # drop selectors covered by a wider one (pytest would collect them twice)
    targets = [
        s
        for s in wanted
        if not any(o is not s and o.covers(s.test) and o.test != s.test for o in wanted)
    ]
    excluded = [e for e in exclude if any(t.covers(e.test) or e.covers(t.test) for t in targets)]
    # a target wholly inside an exclusion is not run at all
    targets = [
        t for t in targets if not any(e.covers(t.test) or e.test == t.test for e in excluded)
    ]
    return targets, absent, excluded


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------

# "unfinished": started but stopped by --time-limit before it reported; not a
# verdict on the code (a test that dies on its own stays an "error").
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "unfinished")


def fold_reports(lines: list[dict]) -> tuple[dict[str, dict], list[dict], int | None]:
    """Per-node outcome from the plugin's per-phase records.

    Returns:
        (nodes, collect_errors, collected): nodes maps nodeid to
        ``{"outcome", "message", "duration"}``.
    """
    nodes: dict[str, dict] = {}
    errors: list[dict] = []
    collected = None
    for r in lines:
        ev = r.get("event")
        if ev == "collected":
            collected = r["count"] if collected is None else max(collected, r["count"])
            continue
        if ev == "collecterror":
            errors.append({"nodeid": r["nodeid"], "message": r["message"]})
            continue
        if ev != "test":
            continue
        n = nodes.setdefault(r["nodeid"], {"outcome": None, "message": "", "duration": 0.0})
        n["duration"] = round(n["duration"] + r.get("duration", 0.0), 3)
        when, outcome = r["when"], r["outcome"]
        if outcome == "failed":
            if when == "call":
                n["outcome"] = "failed"
            elif n["outcome"] not in ("failed",):
                n["outcome"] = "error"
            n["message"] = n["message"] or r["message"]
        elif outcome == "skipped" and n["outcome"] not in ("failed", "error"):
            n["outcome"] = "xfailed" if r.get("wasxfail") else "skipped"
            n["message"] = r["message"]
        elif outcome == "passed" and when == "call" and n["outcome"] is None:
            n["outcome"] = "xpassed" if r.get("wasxfail") else "passed"
    for n in nodes.values():
        if n["outcome"] is None:  # setup passed, no call record (killed mid-test)
            n["outcome"] = "error"
            n["message"] = n["message"] or "no result recorded (interrupted?)"
            n["incomplete"] = True
    return nodes, errors, collected


def _skip_reason(message: str) -> str:
    return message.removeprefix("Skipped: ").strip() or "(no reason given)"


def _node_outcomes(nodes: dict[str, dict]) -> dict:
    """The summary's ``nodes`` (id -> outcome) and ``skip_messages`` (id -> reason)."""
    ordered = sorted(nodes.items())
    return {
        "nodes": {k: v["outcome"] for k, v in ordered},
        "skip_messages": {
            k: _skip_reason(v["message"]) for k, v in ordered if v["outcome"] == "skipped"
        },
    }


def summarize(
    groups: list[Group],
    nodes: dict[str, dict],
    collect_errors: list[dict],
    absent: list[Selector],
    excluded: list[Selector],
) -> list[dict]:
    rows = []
    for g in groups:
        mine = {k: v for k, v in nodes.items() if any(s.covers(k) for s in g.selectors)}
        counts = Counter(v["outcome"] for v in mine.values())
        errs = [
            e
            for e in collect_errors
            if any(
                s.covers(e["nodeid"]) or Selector(e["nodeid"], "").covers(s.test)
                for s in g.selectors
            )
        ]
        rows.append(
            {
                "name": g.name,
                "subject": g.subject,
                "selectors": [s.__dict__ for s in g.selectors],
                "collected": len(mine),
                **{o: counts.get(o, 0) for o in OUTCOMES},
                "collect_errors": errs,
                "skip_reasons": dict(
                    Counter(
                        _skip_reason(v["message"])
                        for v in mine.values()
                        if v["outcome"] == "skipped"
                    ).most_common()
                ),
                "failures": [
                    {"nodeid": k, "outcome": v["outcome"], "message": v["message"]}
                    for k, v in mine.items()
                    if v["outcome"] in ("failed", "error")
                ],
                "not_run": [
                    {
                        "test": s.test,
                        "reason": "not in this tree (" + (s.reason or "selected") + ")",
                    }
                    for s in absent
                    if s in g.selectors or any(x.test == s.test for x in g.selectors)
                ]
                + [
                    {"test": e.test, "reason": e.reason}
                    for e in excluded
                    if any(s.covers(e.test) or e.covers(s.test) for s in g.selectors)
                ],
            }
        )
    return rows


def format_table(result: dict, max_red: int = 40) -> str:
    head = (
        "patch",
        "collected",
        "passed",
        "failed",
        "error",
        "skipped",
        "xfail",
        "unfinished",
        "not run",
    )
    lines = [
        f"vLLM tests on {result['device']}: tree {result['tree']}"
        + (f" @ {result['rev'][:12]}" if result.get("rev") else "")
        + (f" ({result['label']})" if result.get("label") else ""),
        "",
    ]
    width = max([len(head[0])] + [len(r["name"]) for r in result["groups"]] + [14])
    lines.append(f"{head[0]:<{width}}" + "".join(f"{h:>11}" for h in head[1:]))
    for r in result["groups"] + [result["total"]]:
        if r is result["total"]:
            lines.append("-" * (width + 11 * (len(head) - 1)))
        vals = (
            r["collected"],
            r["passed"],
            r["failed"],
            r["error"] + len(r["collect_errors"]),
            r["skipped"],
            r["xfailed"],
            r["unfinished"],
            len(r["not_run"]),
        )
        lines.append(f"{r['name']:<{width}}" + "".join(f"{v:>11}" for v in vals))
    lines.append("")
    lines.append(
        f"pytest exit {result['pytest_exit']}, {result['duration_s']:.0f} s, "
        f"verdict: {result['verdict']}"
    )
    red: dict[str, str] = {}
    for r in result["groups"]:
        for e in r["collect_errors"]:
            red.setdefault(e["nodeid"], f"  COLLECTION ERROR {e['nodeid']}: {e['message']}")
        for f in r["failures"]:
            red.setdefault(f["nodeid"], f"  {f['outcome'].upper()} {f['nodeid']}: {f['message']}")
    lines += sorted(red.values())[:max_red]
    if len(red) > max_red:
        lines.append(f"  ... and {len(red) - max_red} more (see the JSON summary or JUnit XML)")
    for r in result["groups"]:
        if r["skip_reasons"] or r["not_run"]:
            lines.append(f"{r['name']}:")
        for reason, n in r["skip_reasons"].items():
            lines.append(f"  skipped {n:>5} x {reason}")
        for nr in r["not_run"]:
            lines.append(f"  not run: {nr['test']}: {nr['reason']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def tree_version(tree: Path) -> str:
    """The vLLM version recorded in the tree's ``vllm/_version.py``."""
    import re

    path = Path(tree) / "vllm" / "_version.py"
    try:
        m = re.search(
            r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""",
            path.read_text(),
            re.MULTILINE,
        )
    except FileNotFoundError:
        m = None
    if not m:
        raise TestSetupError(f"{path}: no __version__ (is {tree} a vLLM tree?)")
    return m.group(1)


def _git_rev(tree: Path) -> str | None:
    """HEAD of ``tree`` if it is the top of a git checkout (not inside another)."""
    try:
        top, rev = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return rev if Path(top).resolve() == Path(tree).resolve() else None


def _default_sigint() -> None:
    # runs in the child before exec: Python turns SIGINT into KeyboardInterrupt
    # only when it starts with SIGINT at its default, not ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """Stop pytest: SIGINT (it writes its reports), then SIGTERM, then SIGKILL.

    Each step waits ``STOP_GRACE_S``. A SIGINT can be lost (pytest still
    starting, a library that swallows KeyboardInterrupt); what the plugin
    recorded before a harder stop is kept either way.
    """
    proc.send_signal(signal.SIGINT)  # only pytest's main process: it stops xdist
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.wait(timeout=STOP_GRACE_S)
            break
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
    proc.wait()
    try:  # a worker still alive after pytest's main process ended
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_pytest(
    tree: Path,
    groups: list[Group],
    exclude: list[Selector],
    *,
    device: str,
    junit: Path | None = None,
    workers: str | None = None,
    keyword: str | None = None,
    pytest_args: list[str] | None = None,
    time_limit: float | None = None,
    label: str | None = None,
    python: str | None = None,
    quiet: bool = False,
) -> dict:
    """Run the selection in ``tree``; return the result dict (see ``--json``)."""
    tree = Path(tree).resolve()
    targets, absent, excluded = plan(tree, groups, exclude)
    tmp = Path(tempfile.mkdtemp(prefix="moepatch-test-"))
    try:
        (tmp / f"{PLUGIN_NAME}.py").write_text(PLUGIN_SOURCE)
        report = tmp / "report.jsonl"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree), str(tmp)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env[REPORT_ENV] = str(report)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            env.setdefault("TRITON_INTERPRET", "1")
        cmd = [
            python or sys.executable,
            "-m",
            "pytest",
            "-p",
            PLUGIN_NAME,
            "-p",
            "no:cacheprovider",
            "-rN",
            "-q",
        ]
        if junit:
            junit = Path(junit).resolve()
            junit.parent.mkdir(parents=True, exist_ok=True)
            cmd += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if workers:
            cmd += ["-n", str(workers)]
        if keyword:
            cmd += ["-k", keyword]
        # files: --ignore (never imported); nodes: deselected by the plugin with
        # exact node-id boundaries (pytest's --deselect is a plain string prefix)
        cmd += [f"--ignore={e.test}" for e in excluded if "::" not in e.test]
        env[DESELECT_ENV] = json.dumps([e.test for e in excluded if "::" in e.test])
        cmd += list(pytest_args or [])
        cmd += [t.test for t in targets]
        t0 = time.time()
        rc: int
        timed_out = False
        if not targets:
            rc = EXIT_EMPTY
        else:
            out = subprocess.DEVNULL if quiet else None
            # its own process group, so that a stop reaches xdist's workers too;
            # SIGINT at its default even when this process inherited it ignored
            proc = subprocess.Popen(
                cmd,
                cwd=tree,
                env=env,
                stdout=out,
                process_group=0,
                preexec_fn=_default_sigint,
            )
            try:
                rc = proc.wait(timeout=time_limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(proc)
                rc = EXIT_INTERRUPTED
            except KeyboardInterrupt:
                _stop(proc)
                raise
        duration = time.time() - t0
        records = []
        if report.is_file():
            for line in report.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nodes, collect_errors, collected = fold_reports(records)
    if timed_out:
        for n in nodes.values():
            if n.get("incomplete"):
                n["outcome"] = "unfinished"
                n["message"] = f"stopped by the {time_limit:.0f} s time limit"
    rows = summarize(groups, nodes, collect_errors, absent, excluded)
    counts = Counter(v["outcome"] for v in nodes.values())
    total = {
        "name": "total (each test once)",
        "collected": len(nodes),
        **{o: counts.get(o, 0) for o in OUTCOMES},
        "collect_errors": collect_errors,
        "not_run": [{"test": s.test, "reason": "not in this tree"} for s in absent]
        + [{"test": e.test, "reason": e.reason} for e in excluded],
    }
    red = counts.get("failed", 0) + counts.get("error", 0) + len(collect_errors)
    complete = sum(1 for v in nodes.values() if not v.get("incomplete"))
    finished = timed_out and collected is not None and complete >= collected > 0
    if finished and not red:
        # every test reported, but pytest (e.g. xdist workers holding CUDA IPC
        # handles) did not exit before the limit: the results stand, said so
        msg = (
            f"GREEN (all {collected} tests reported; pytest did not exit before "
            f"the {time_limit:.0f} s limit and was stopped)"
        )
        verdict, code = (
            msg,
            EXIT_OK,
        )
    elif finished:
        verdict, code = (
            "RED (pytest did not exit; stopped at the time limit)",
            EXIT_FAILED,
        )
    elif timed_out:
        if collected is None:
            shown = f", before pytest finished collecting ({complete} tests reported)"
        else:
            shown = f" ({complete} of {collected} tests reported)"
        msg = f"INTERRUPTED after the {time_limit:.0f} s time limit{shown}"
        verdict, code = (
            msg,
            EXIT_INTERRUPTED,
        )
    elif red:
        verdict, code = "RED", EXIT_FAILED
    elif rc == EXIT_EMPTY or not nodes:
        verdict, code = "EMPTY: pytest collected no tests", EXIT_EMPTY
    elif rc in (0, 1):  # 1 with nothing red: e.g. a strict xpass, counted by pytest
        verdict, code = ("GREEN", EXIT_OK) if rc == 0 else ("RED", EXIT_FAILED)
    else:
        verdict, code = f"pytest exit {rc}", rc
    return {
        "tree": str(tree),
        "rev": _git_rev(tree),
        "label": label,
        "device": device,
        "command": cmd,
        "pytest_exit": rc,
        "exit_code": code,
        "verdict": verdict,
        "duration_s": round(duration, 1),
        "collected_reported": collected,
        "junit": str(junit) if junit else None,
        "groups": rows,
        "total": total,
        **_node_outcomes(nodes),
    }


def compare(base: dict, patched: dict) -> dict:
    """Tests that pass on base but not on the patched tree (regressions)."""
    good = {"passed", "xfailed"}
    regress = sorted(
        k
        for k, v in patched["nodes"].items()
        if v in ("failed", "error") and base["nodes"].get(k) in good
    )
    lost = sorted(
        k
        for k, v in base["nodes"].items()
        if v == "passed" and patched["nodes"].get(k) == "skipped"
    )
    unfinished = sorted(
        k
        for k, v in base["nodes"].items()
        if v == "passed" and patched["nodes"].get(k) == "unfinished"
    )
    new_red = sorted(
        k
        for k, v in patched["nodes"].items()
        if v in ("failed", "error") and k not in base["nodes"]
    )
    both_red = sorted(
        k
        for k, v in patched["nodes"].items()
        if v in ("failed", "error") and base["nodes"].get(k) in ("failed", "error")
    )
    return {
        "regressions": regress,
        "passed_on_base_skipped_patched": lost,
        "passed_on_base_unfinished_patched": unfinished,
        "red_only_in_patched_new_tests": new_red,
        "red_on_both": both_red,
    }


def format_compare(c: dict) -> str:
    lines = []
    for key, title in (
        ("regressions", "pass on base, red on patched"),
        ("passed_on_base_skipped_patched", "pass on base, skipped on patched"),
        ("passed_on_base_unfinished_patched", "pass on base, cut off by the time limit on patched"),
        ("red_only_in_patched_new_tests", "red on patched, absent on base"),
        ("red_on_both", "red on both (base problem)"),
    ):
        lines.append(f"{title}: {len(c[key])}")
        lines += [f"  {k}" for k in c[key][:200]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# merge: one summary from a selection split over several runs
# --------------------------------------------------------------------------

# Worst first. Where two runs give a test different outcomes, the merged
# summary keeps the worse one and says so; "unfinished" (cut off by the time
# limit) is no outcome at all, so any other beats it.
MERGE_ORDER = ("error", "failed", "xpassed", "skipped", "xfailed", "passed", "unfinished")


def _rank(outcome: str) -> int:
    # an outcome this code does not know counts as the worst
    return MERGE_ORDER.index(outcome) if outcome in MERGE_ORDER else -1


def load_summary(path: Path) -> dict:
    """Read a ``--json`` summary; a one-line error if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TestSetupError(f"{path}: {e}") from None
    if not isinstance(data, dict) or not {"device", "nodes", "groups", "total"} <= data.keys():
        raise TestSetupError(f"{path}: not a test summary (as written by --json)")
    return data


def _ran(result: dict, test: str) -> bool:
    """Whether the run ``result`` selected ``test`` and did not leave it out."""
    probe = Selector(test, "")
    selected = any(
        Selector(**s).covers(test) or probe.covers(s["test"])
        for g in result["groups"]
        for s in g["selectors"]
    )
    left_out = [n["test"] for r in [result["total"], *result["groups"]] for n in r["not_run"]]
    return selected and not any(Selector(t, "").covers(test) for t in left_out)


def _still_not_run(entries: list[dict], results: list[dict]) -> list[dict]:
    """``not_run`` entries that no run ran, once each (the first reason kept)."""
    out: list[dict] = []
    for e in entries:
        if e["test"] not in [o["test"] for o in out] and not any(
            _ran(r, e["test"]) for r in results
        ):
            out.append(e)
    return out


def merge(results: list[dict], names: list[str], label: str | None = None) -> dict:
    """One summary from the summaries of runs that each ran part of a selection.

    All runs must be of the same tree revision on the same device. A test in
    several runs keeps its worse outcome (any outcome beats "unfinished"); the
    group rows are recounted from the merged tests; a test left out of one run
    but run in another is no longer "not run". The result has the layout of
    ``run_pytest``'s (so ``format_table`` and ``compare`` take it), plus
    ``merged_from``, ``inputs`` and ``conflicts``.
    """
    if not results:
        raise TestSetupError("merge needs at least one summary")
    first = results[0]
    for name, r in zip(names, results, strict=True):
        for key in ("device", "rev"):
            if r.get(key) != first.get(key):
                raise TestSetupError(
                    f"{name}: {key} {r.get(key)!r} differs from {first.get(key)!r} "
                    f"of {names[0]}; only runs of one tree on one device can be merged"
                )

    nodes: dict[str, dict] = {}
    seen: dict[str, list[tuple[str, str]]] = {}
    for name, r in zip(names, results, strict=True):
        messages = {f["nodeid"]: f["message"] for g in r["groups"] for f in g["failures"]}
        messages.update(r.get("skip_messages") or {})
        for k, outcome in r["nodes"].items():
            seen.setdefault(k, []).append((name, outcome))
            message = messages.get(k, "")
            if outcome == "unfinished":
                message = "stopped by the time limit"
            old = nodes.get(k)
            if old is None or _rank(outcome) < _rank(old["outcome"]):
                nodes[k] = {"outcome": outcome, "message": message, "duration": 0.0}
            elif outcome == old["outcome"] and old["message"] in ("", _skip_reason("")):
                old["message"] = message  # the same outcome, with its reason
    conflicts = [
        {"nodeid": k, "kept": nodes[k]["outcome"], "outcomes": [list(s) for s in v]}
        for k, v in sorted(seen.items())
        if len({o for _, o in v if o != "unfinished"}) > 1
    ]

    groups: dict[str, Group] = {}
    for r in results:
        for row in r["groups"]:
            g = groups.setdefault(row["name"], Group(row["name"], row.get("subject", "")))
            for s in row["selectors"]:
                if s["test"] not in [x.test for x in g.selectors]:
                    g.selectors.append(Selector(**s))
    collect_errors: list[dict] = []
    for r in results:
        collect_errors += [e for e in r["total"]["collect_errors"] if e not in collect_errors]
    rows = summarize(list(groups.values()), nodes, collect_errors, [], [])
    for row in rows:
        mine = [g for r in results for g in r["groups"] if g["name"] == row["name"]]
        row["not_run"] = _still_not_run([n for g in mine for n in g["not_run"]], results)
    counts = Counter(v["outcome"] for v in nodes.values())
    total = {
        "name": "total (each test once)",
        "collected": len(nodes),
        **{o: counts.get(o, 0) for o in OUTCOMES},
        "collect_errors": collect_errors,
        "not_run": _still_not_run([n for r in results for n in r["total"]["not_run"]], results),
    }

    # what the merged tests cannot show: runs that ended without a test to
    # blame, and tests an interrupted run never got to that no other run ran
    red_runs, odd_runs, unreported = [], [], []
    for name, r in zip(names, results, strict=True):
        code = r.get("exit_code")
        has_red = r["total"]["collect_errors"] or any(
            v in ("failed", "error") for v in r["nodes"].values()
        )
        if code == EXIT_FAILED and not has_red:
            red_runs.append(f"{name}: {r.get('verdict')} with no red test recorded")
        elif code not in (EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_EMPTY):
            odd_runs.append((code, f"{name}: {r.get('verdict')}"))
        want = r.get("collected_reported")
        if code != EXIT_INTERRUPTED or (want is not None and want <= len(r["nodes"])):
            continue
        if want is not None and sum(1 for k in nodes if _ran(r, k)) >= want:
            continue  # the tests it never reported were run by another run
        targets = [s["test"] for g in r["groups"] for s in g["selectors"] if _ran(r, s["test"])]
        others = [o for o in results if o is not r and o.get("exit_code") != EXIT_INTERRUPTED]
        if targets and all(any(_ran(o, t) for o in others) for t in targets):
            continue  # its whole selection was run again by a run that completed
        shown = (
            f"{want - len(r['nodes'])} of {want}" if want is not None else "an unknown number of"
        )
        unreported.append(f"{name}: {shown} tests never reported")

    red = counts.get("failed", 0) + counts.get("error", 0) + len(collect_errors)
    notes = red_runs + [n for _, n in odd_runs] + unreported
    if conflicts:
        notes.append(
            f"{len(conflicts)} test(s) with different outcomes in different runs, the worse "
            "kept: "
            + ", ".join(f"{c['nodeid']} {c['kept']}" for c in conflicts[:5])
            + (" ..." if len(conflicts) > 5 else "")
        )
    if red or red_runs:
        verdict, code = "RED", EXIT_FAILED
    elif odd_runs:
        code = odd_runs[0][0]
        verdict = f"pytest exit {code}"
    elif counts.get("unfinished") or unreported:
        n = counts.get("unfinished", 0)
        verdict, code = (
            f"INTERRUPTED ({n} test(s) still cut off by a time limit after merging)",
            EXIT_INTERRUPTED,
        )
    elif not nodes:
        verdict, code = "EMPTY: pytest collected no tests", EXIT_EMPTY
    else:
        verdict, code = "GREEN", EXIT_OK
    verdict += f" [merged from {len(results)} runs]"
    if notes:
        verdict += ": " + "; ".join(notes)

    trees = list(dict.fromkeys(str(r.get("tree")) for r in results))
    labels = list(dict.fromkeys(r.get("label") for r in results))
    reported = [r["collected_reported"] for r in results if r.get("collected_reported") is not None]
    junits = [r["junit"] for r in results if r.get("junit")]
    return {
        "tree": ", ".join(trees),
        "rev": first.get("rev"),
        "label": label or (labels[0] if len(labels) == 1 else None),
        "device": first["device"],
        "command": [r.get("command") for r in results],
        "pytest_exit": code,
        "exit_code": code,
        "verdict": verdict,
        "duration_s": round(sum(r.get("duration_s") or 0.0 for r in results), 1),
        "collected_reported": sum(reported) if reported else None,  # summed over the runs
        "junit": junits or None,
        "groups": rows,
        "total": total,
        **_node_outcomes(nodes),
        "merged_from": list(names),
        "inputs": [
            {
                "file": name,
                "label": r.get("label"),
                "pytest_exit": r.get("pytest_exit"),
                "exit_code": r.get("exit_code"),
                "verdict": r.get("verdict"),
                "duration_s": r.get("duration_s"),
            }
            for name, r in zip(names, results, strict=True)
        ],
        "conflicts": conflicts,
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


TEST_DOC = "Run the patches' tests and vLLM's upstream tests on a built tree.\n\n" + (
    __doc__.split("\n\n", 1)[1].replace("``", "`")
)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``apply.py test``'s options to ``p``."""
    p.add_argument(
        "--patch",
        action="append",
        metavar="NAME",
        help="run this patch's tests (repeatable; default: every patch)",
    )
    p.add_argument(
        "--all-moe",
        action="store_true",
        help=f"also run every upstream MoE kernel test ([{ALL_MOE}] in patches/{TESTS_TOML})",
    )
    p.add_argument(
        "--test",
        action="append",
        metavar="PATH[::NODE]",
        help="run this test file/node too, as its own row (repeatable)",
    )
    p.add_argument(
        "--skip-test",
        action="append",
        metavar="PATH[::NODE]",
        help="leave this test file/node out of this run (repeatable); the table lists it "
        "as not run, e.g. to split a long GPU selection over several calls",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: VLLM_TARGET_DEVICE=cpu, TRITON_INTERPRET=1 (default); "
        "cuda: with the release wheel's compiled ops placed in the tree",
    )
    p.add_argument(
        "--tree",
        type=Path,
        default=DEFAULT_TREE,
        help="built vLLM tree (default: build/vllm)",
    )
    p.add_argument(
        "--base",
        action="store_true",
        help="run the selection on the tree's pristine base (tag vllm-base) "
        "in a temporary git worktree",
    )
    p.add_argument("--base-ref", default="vllm-base", help=argparse.SUPPRESS)
    p.add_argument(
        "--selection",
        type=Path,
        metavar="FILE",
        help="a resolved selection (JSON from ci/device_bundle.py) instead of reading patches/",
    )
    p.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML here")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the JSON summary here")
    p.add_argument("--table", type=Path, metavar="PATH", help="also write the table here")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression")
    p.add_argument("-n", dest="workers", metavar="N", help="pytest-xdist workers (e.g. 8, auto)")
    p.add_argument(
        "--pytest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra pytest argument (repeatable), e.g. --pytest-arg=-x",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="interrupt pytest after S seconds (SIGINT, then SIGTERM and SIGKILL "
        f"{STOP_GRACE_S:.0f} s apart; partial results kept; exit 2)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when nothing was collected (pytest's exit 5)",
    )
    p.add_argument(
        "--precompiled",
        default="auto",
        metavar="auto|none|DIR",
        help="cuda only: where the compiled ops come from: auto = the release "
        "wheel from the index (cached); DIR = a folder laid out like the wheel; "
        "none = the tree already has them",
    )
    p.add_argument("--wheel", type=Path, help="cuda only: a local copy of the release wheel")
    p.add_argument("--label", help="a name for this run in the table/JSON")
    p.add_argument(
        "--list",
        action="store_true",
        help="print the selection (pytest targets and exclusions) and exit",
    )


def _base_worktree(tree: Path, ref: str) -> Path:
    if _git_rev(tree) is None:
        raise TestSetupError(f"{tree} is not a git repository; --base needs the built tree")
    tmp = Path(tempfile.mkdtemp(prefix="moepatch-base-"))
    wt = tmp / "vllm"
    r = subprocess.run(
        ["git", "-C", str(tree), "worktree", "add", "--detach", "-q", str(wt), ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TestSetupError(f"cannot check out {ref} of {tree}: {r.stderr.strip()}")
    return wt


def _drop_worktree(tree: Path, wt: Path) -> None:
    subprocess.run(
        ["git", "-C", str(tree), "worktree", "remove", "--force", str(wt)],
        capture_output=True,
        check=False,
    )
    subprocess.run(["git", "-C", str(tree), "worktree", "prune"], capture_output=True, check=False)
    shutil.rmtree(wt.parent, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Execute ``apply.py test``; print the table; return the exit status."""
    tree = Path(args.tree)
    if not (tree / "vllm" / "__init__.py").is_file():
        raise TestSetupError(f"{tree}: no built vLLM tree here", hint="run `python apply.py` first")
    if args.selection:
        try:
            spec = json.loads(Path(args.selection).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TestSetupError(f"{args.selection}: {e}") from None
        if spec.get("device") != args.device:
            by_device = spec.get("exclude_by_device", {})
            if args.device not in by_device:
                raise TestSetupError(f"{args.selection}: made for {spec.get('device')}")
            spec = dict(spec, device=args.device, exclude=by_device[args.device])
    else:
        spec = build_spec(getattr(args, "patches", None) or REPO / "patches", args.device)
    groups = select(spec, args.patch, args.all_moe, args.test)
    exclude = [Selector(**s) for s in spec.get("exclude", [])]
    exclude += [Selector(t, "left out with --skip-test") for t in args.skip_test or []]
    if not any(g.selectors for g in groups):
        print(
            "no tests are selected (no Tests: trailers and no patches/tests.toml entries)",
            file=sys.stderr,
        )
        return EXIT_OK if args.allow_empty else EXIT_EMPTY

    work = tree
    if args.base:
        work = _base_worktree(tree, args.base_ref)
    try:
        if args.list:
            targets, absent, excluded = plan(work.resolve(), groups, exclude)
            for t in targets:
                print(f"run      {t.test}    # {t.reason}")
            for a in absent:
                print(f"absent   {a.test}    # {a.reason}")
            for e in excluded:
                print(f"excluded {e.test}    # {e.reason}")
            return EXIT_OK
        if args.device == "cuda" and args.precompiled != "none":
            from . import precompiled

            source = None if args.precompiled == "auto" else Path(args.precompiled)
            placed = precompiled.place_modules(
                work, tree_version(work), wheel=args.wheel, source_dir=source
            )
            if placed.copied:
                print(
                    f"placed {', '.join(placed.copied)} from {placed.wheel}",
                    file=sys.stderr,
                )
        result = run_pytest(
            work,
            groups,
            exclude,
            device=args.device,
            junit=args.junit,
            workers=args.workers,
            keyword=args.keyword,
            pytest_args=args.pytest_arg,
            time_limit=args.time_limit,
            quiet=getattr(args, "quiet", False),
            label=args.label or ("base" if args.base else None),
        )
    finally:
        if args.base:
            _drop_worktree(tree, work)
    if result["exit_code"] == EXIT_EMPTY and args.allow_empty:
        result["exit_code"] = EXIT_OK
    table = format_table(result)
    print(table, end="")
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result["exit_code"]


def main(argv: list[str] | None = None) -> int:
    """``python -m moepatch.testing [compare BASE.json PATCHED.json | test options]``.

    ``merge A.json B.json ... --json OUT.json [--table OUT.txt] [--label L]``
    combines the summaries of a selection split over several runs into one.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        ap = argparse.ArgumentParser(
            prog="python -m moepatch.testing merge",
            description="Combine the --json summaries of runs that each ran part of a "
            "selection (same tree revision, same device) into one summary.",
        )
        ap.add_argument("inputs", type=Path, nargs="+", metavar="SUMMARY.json")
        ap.add_argument(
            "--json", type=Path, required=True, metavar="PATH", help="write the summary here"
        )
        ap.add_argument("--table", type=Path, metavar="PATH", help="also write the table here")
        ap.add_argument("--label", help="a name for the merged run in the table/JSON")
        a = ap.parse_args(argv[1:])
        try:
            result = merge([load_summary(p) for p in a.inputs], [str(p) for p in a.inputs], a.label)
        except ToolError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        table = format_table(result)
        print(table, end="")
        for path, text in ((a.table, table), (a.json, json.dumps(result, indent=1) + "\n")):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        return result["exit_code"]
    if argv[:1] == ["compare"]:
        ap = argparse.ArgumentParser(prog="python -m moepatch.testing compare")
        ap.add_argument("base", type=Path)
        ap.add_argument("patched", type=Path)
        ap.add_argument("--out", type=Path)
        a = ap.parse_args(argv[1:])
        c = compare(json.loads(a.base.read_text()), json.loads(a.patched.read_text()))
        text = format_compare(c)
        print(text, end="")
        if a.out:
            a.out.write_text(text)
        return EXIT_FAILED if c["regressions"] else EXIT_OK
    ap = argparse.ArgumentParser(
        prog="python -m moepatch.testing", description=__doc__.split("\n\n")[0]
    )
    configure_parser(ap)
    # apply.py's common options, for running without the CLI (e.g. on the device)
    ap.add_argument(
        "--patches",
        type=Path,
        default=REPO / "patches",
        help="the patch directory holding `series` (default: %(default)s)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="hide pytest's own output")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
