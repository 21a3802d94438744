"""``apply.py rebase``: its options, the dispatch to start / resume / abort, the report."""

from __future__ import annotations

import json
from pathlib import Path

from . import rebase
from .build import BRANCH
from .errors import ToolError
from .rebase import (
    NEW_BASE,
    NEW_BRANCH,
    OLD_BASE,
    OLD_BRANCH,
    abort,
    range_diff,
    resume,
    start,
)
from .rebase_state import STATE_DIR, RebaseState, load_state
from .replay import UPSTREAMED
from .source import add_source_argument


def report_rows(state: RebaseState) -> list[dict]:
    rows = []
    for e in state.entries:
        word = e.status or "pending"
        if e.status == UPSTREAMED and e.dropped:
            word = "upstreamed, dropped"
        rows.append(
            {
                "name": e.name,
                "result": word,
                "old_commit": e.old_commit,
                "new_commit": e.new_commit,
                "details": e.details,
            }
        )
    return rows


REBASE_DOC = (
    "Move the series to another vLLM release (3-way replay, resumable).\n\n"
    + rebase.__doc__.split("\n\n", 1)[1].replace("``", "`")
)


def configure_rebase(parser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--to",
        metavar="VERSION|COMMIT|PATH",
        help="the vLLM release to move to: a version on the index "
        "(0.32.0), a release commit of the pin's repository, or "
        "a local sdist tarball / release tree / checkout",
    )
    what.add_argument(
        "--continue",
        dest="cont",
        action="store_true",
        help="go on after resolving a conflict (or an interruption)",
    )
    what.add_argument(
        "--skip",
        action="store_true",
        help="drop the conflicting patch (or every upstreamed one) and go on",
    )
    what.add_argument(
        "--abort",
        action="store_true",
        help="stop; restore vllm.pin and patches/, remove the work tree",
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this patch from the series (repeatable)",
    )
    add_source_argument(
        parser,
        help="where the current pinned release comes from, as for "
        "apply; also how a --to VERSION is fetched "
        "(default: auto)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="the rebase work tree (default: build/rebase beside patches/)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def _print_report(state: RebaseState, work: Path, diff: str, as_json: bool) -> None:
    rows = report_rows(state)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "from": state.old_pin["version"],
                    "to": state.new_pin["version"],
                    "pin": state.new_pin,
                    "work": str(work),
                    "patches": rows,
                    "range_diff": diff,
                },
                indent=2,
            )
        )
        return
    old, new = state.old_pin["version"], state.new_pin["version"]
    print(f"rebased {len(rows)} patch(es) from vLLM {old} to {new} ({state.new_base_source})")
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        commit = (r["new_commit"] or "")[:12] or "-"
        print(f"  {r['result']:<20} {r['name']:<{width}}  {commit}")
    print(
        f"wrote {state.pin_path} (vLLM {new}, sha256 "
        f"{state.new_pin['sdist_sha256'][:16]}...) and {state.patches_dir}/"
    )
    print(f"\nrange-diff {OLD_BASE}..{OLD_BRANCH} {NEW_BASE}..{NEW_BRANCH} (in {work}):")
    print(diff.rstrip("\n") or "  (no patches on either side)")
    print(
        f"\nthe rebased tree is {work} (branch '{BRANCH}'); "
        "run `python apply.py` to rebuild the build tree"
    )


def run_rebase(args) -> int:
    work = args.work.resolve()  # git runs inside it: paths given to git must be absolute
    if args.abort:
        state = abort(work)
        print(
            f"rebase to {state.to} aborted; {state.pin_path} and "
            f"{state.patches_dir}/ restored, {work} removed"
        )
        return 0
    in_progress = load_state(work)
    if in_progress and in_progress.phase != "done":
        state = resume(work, args.to, args.skip, args.drop)
    elif args.to:
        state = start(args.to, args.pin, args.patches, work, args.source, args.drop)
    else:
        raise ToolError(f"no rebase in progress in {work}; start one with --to VERSION")
    diff = range_diff(work)
    (work / STATE_DIR / "range-diff.txt").write_text(diff)
    _print_report(state, work, diff, args.json)
    return 0
