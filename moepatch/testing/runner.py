"""Running pytest inside the tree with the reporting plugin, under a time limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ..errors import TestSetupError
from .selection import Group, Selector, plan
from .summary import (
    EXIT_EMPTY,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OUTCOMES,
    fold_reports,
    node_outcomes,
    summarize,
)

PLUGIN = Path(__file__).with_name("pytest_plugin.py")
PLUGIN_NAME = "_moepatch_pytest_report"
REPORT_ENV = "MOEPATCH_PYTEST_REPORT"
DESELECT_ENV = "MOEPATCH_PYTEST_DESELECT"

# How long pytest gets after each stop signal (SIGINT, SIGTERM) at --time-limit.
STOP_GRACE_S = 5.0


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


def git_rev(tree: Path) -> str | None:
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
        shutil.copyfile(PLUGIN, tmp / f"{PLUGIN_NAME}.py")
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
        "rev": git_rev(tree),
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
        **node_outcomes(nodes),
    }
