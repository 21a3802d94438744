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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import TestSetupError, ToolError
from ..layout import default_build_paths
from .merge import compare, format_compare, load_summary, merge
from .runner import STOP_GRACE_S, git_rev, run_pytest, tree_version
from .selection import ALL_MOE, TESTS_TOML, Selector, build_spec, plan, select
from .summary import EXIT_EMPTY, EXIT_FAILED, EXIT_OK, format_table

REPO = Path(__file__).resolve().parent.parent.parent


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
        help="built vLLM tree (default: build/vllm beside patches/)",
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
    if git_rev(tree) is None:
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
            from .. import precompiled

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
    default_build_paths(args)
    try:
        return run(args)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
