"""Summaries of several runs: ``compare`` (base vs patched) and ``merge``
(one summary from a selection split over several runs)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import TestSetupError
from .selection import Group, Selector
from .summary import (
    EXIT_EMPTY,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OUTCOMES,
    node_outcomes,
    skip_reason,
    summarize,
)


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
            elif outcome == old["outcome"] and old["message"] in ("", skip_reason("")):
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
        **node_outcomes(nodes),
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
