"""Results of a run: per-test outcomes, per-patch rows, exit codes, the table."""

from __future__ import annotations

from collections import Counter

from .selection import Group, Selector

# Exit codes (pytest's own where they mean the same thing).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 2
EXIT_EMPTY = 5

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


def skip_reason(message: str) -> str:
    return message.removeprefix("Skipped: ").strip() or "(no reason given)"


def node_outcomes(nodes: dict[str, dict]) -> dict:
    """The summary's ``nodes`` (id -> outcome) and ``skip_messages`` (id -> reason)."""
    ordered = sorted(nodes.items())
    return {
        "nodes": {k: v["outcome"] for k, v in ordered},
        "skip_messages": {
            k: skip_reason(v["message"]) for k, v in ordered if v["outcome"] == "skipped"
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
                        skip_reason(v["message"])
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
