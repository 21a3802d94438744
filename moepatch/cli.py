"""Command line of apply.py: parse, dispatch, report errors in one line."""

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import sys
from pathlib import Path

from . import logger
from .errors import ToolError
from .layout import default_build_paths

ROOT = Path(__file__).resolve().parent.parent

DESCRIPTION = """\
Build, test and maintain a patched vLLM tree.

vllm.pin names one vLLM release; patches/series lists the patches applied on top
of it, in order. `python apply.py` (same as `python apply.py apply`) fetches the
pinned release, verifies it, and writes a git checkout to build/vllm with the
release as the commit tagged `vllm-base` and one commit per patch on the branch
`patched`. Running it again with nothing changed does nothing.
"""

EPILOG = """\
exit codes: 1 other error, 2 usage, 3 bad pin, 4 series file missing or a patch
file not listed in it, 5 verification failed (hash, version, commit), 6 network
unreachable, 7 patch conflict, 8 target has local work, 9 target locked,
10 patches/ drifted from the tree, 11 unsafe archive, 12 truncated download,
13 series entry listed twice, 14 listed patch file missing, 15 not a patch,
16 a git command failed, 17 the cache cannot be written (-v: the details),
130 interrupted (Ctrl-C). `check` collects what it finds (missing or unlisted
files, headers, conflicts) and exits 4, or 10 when only the round trip differs.
Downloads and pristine bases are cached in $VLLM_MOE_PATCHES_CACHE
(default: $XDG_CACHE_HOME/vllm-moe-patches, i.e. ~/.cache/vllm-moe-patches).
"""

# name -> (module, one-line help). Modules are imported only when run.
COMMANDS = {
    "apply": ("moepatch.commands", "build the patched tree (default)"),
    "status": ("moepatch.commands", "show the pin, the source and each patch's state"),
    "export": ("moepatch.commands", "rewrite patches/ from the commits of the built tree"),
    "check": ("moepatch.commands", "lint the series, apply it in a scratch tree, compare"),
    "test": (
        "moepatch.testing.command",
        "run the patches' tests and vLLM's upstream tests on the tree",
    ),
    "rebase": ("moepatch.rebase_cli", "move the series to another vLLM release (3-way, resumable)"),
    "matrix": ("moepatch.matrix", "which patch applies to which release"),
    "upstream": ("moepatch.upstream", "one patch as an upstream PR: branch, tests, lint, PR text"),
    "wheel": ("moepatch.wheel", "an installable patched vLLM wheel: release wheel + the series"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--pin", type=Path, default=ROOT / "vllm.pin", help="the pin file (default: %(default)s)"
    )
    group.add_argument(
        "--patches",
        type=Path,
        default=ROOT / "patches",
        help="the patch directory holding `series` (default: %(default)s)",
    )
    group.add_argument(
        "--cache-dir", type=Path, help="cache for downloads and bases (sets VLLM_MOE_PATCHES_CACHE)"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="say more, and give an error's details (git's own output); -vv: every git command",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="only errors (and --json output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apply.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = getattr(module, f"{name.upper()}_DOC", None) or help_text
        p = sub.add_parser(
            name,
            help=help_text,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure = getattr(module, f"configure_{name}", None) or module.configure_parser
        configure(p)
        _common(p)
        p.set_defaults(run=getattr(module, f"run_{name}", None) or module.run)
    return parser


def _setup_logging(args) -> None:
    level = logging.WARNING if args.quiet else logging.INFO
    if args.verbose:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    if args.verbose < 2:
        logging.getLogger("git").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "apply")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    default_build_paths(args)
    if args.cache_dir:
        os.environ["VLLM_MOE_PATCHES_CACHE"] = str(args.cache_dir)
    # -q keeps errors (stderr) and machine-readable --json output only.
    quiet = args.quiet and not getattr(args, "json", False)
    output = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with output:
            return int(args.run(args) or 0)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.verbose:
            for line in e.details:
                print(f"  {line}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(e), "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
