"""The apply, status, export and check commands."""

import json
import sys
from pathlib import Path

from . import export, gitutil, ownership
from .build import build, read_state
from .check import check
from .errors import DriftError, SeriesError, TargetError
from .layout import BASE_TAG, BRANCH
from .pin import load_pin
from .series import read_series
from .source import add_source_argument

APPLY_DOC = """\
Build the patched tree.

Resolves the pinned release from --source, verifies it against vllm.pin, and
writes TARGET as a git checkout: the release is the commit tagged `vllm-base`,
each patch of patches/series one commit on the branch `patched` (applied with
`git am --3way`, fixed committer, committer date = author date, so SHAs repeat).

Re-running with the same pin and series is a no-op. When they changed, the
branch is rebuilt from the base. A patch that does not apply stops the build:
`patched` keeps the previous build (if any) and the branch `moepatch/failed`
holds the patches that did apply. TARGET with uncommitted changes, commits of
its own or content not built by this tool is refused unless --force, which
keeps that work under refs/moepatch/backup/ (or moves a foreign directory's
contents aside to TARGET.backup-<time>). A build that was killed is finished
by the next plain run. Runs may share the cache; a second run on the same
TARGET is refused (exit 9).

sources:
  auto     git when the pin's repository answers within 5 s, else sdist
  git      shallow fetch of the pinned tag; the commit must match the pin
  sdist    the release sdist from pip's configured index (PIP_INDEX_URL, pip.conf),
           sha256-checked before extraction
  PATH     a local git checkout, an extracted release tree or an sdist tarball
"""


def _target_arg(parser) -> None:
    parser.add_argument(
        "--target", type=Path, help="the built tree (default: build/vllm beside patches/)"
    )


def configure_apply(parser) -> None:
    add_source_argument(parser)
    _target_arg(parser)
    parser.add_argument(
        "--force", action="store_true", help="rebuild over local work, keeping it on backup refs"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON result")


def run_apply(args) -> int:
    pin = load_pin(args.pin)
    patches = read_series(args.patches)
    result = build(pin, args.pin.read_bytes(), patches, args.target, args.source, args.force)
    state = result.state
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "noop": result.noop,
                    "target": str(result.target),
                    "seconds": round(result.seconds, 3),
                    "base": state.base,
                    "source": state.source,
                    "head": state.head,
                    "applied": state.applied,
                    "backups": result.backups,
                },
                indent=2,
            )
        )
    elif result.noop:
        print(
            f"{result.target}: up to date ({len(state.applied)} patches on "
            f"vLLM {pin.version}; nothing to do, {result.seconds:.2f} s)"
        )
    else:
        for saved in result.backups:
            print(f"kept local work: {saved}")
        print(f"{result.target}: vLLM {pin.version} from {state.source}")
        for entry in state.applied:
            print(f"  {entry['commit'][:12]}  {entry['name']}")
        print(f"built in {result.seconds:.1f} s; branch '{BRANCH}', base tag '{BASE_TAG}'")
    return 0


def configure_status(parser) -> None:
    _target_arg(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_status(args) -> int:
    pin = load_pin(args.pin)
    patches = read_series(args.patches)
    state = read_state(args.target) if gitutil.is_repo(args.target) else None
    applied = {a["name"]: a["commit"] for a in (state.applied if state else [])}
    current = state is not None and state.built_from(args.pin.read_bytes(), patches)
    rows = []
    for p in patches:
        if state and state.failed == p.name:
            word = "failed"
        elif p.name in applied and current:
            word = "applied"
        elif p.name in applied:
            word = "stale"  # applied from an older version of the file or pin
        else:
            word = "pending"
        rows.append(
            {
                "name": p.name,
                "state": word,
                "commit": applied.get(p.name),
                "status": p.status,
                "upstream": p.upstream,
                "related": p.trailers.get("Related", []),
                "subject": p.subject,
            }
        )
    info = {
        "pin": {
            "version": pin.version,
            "tag": pin.tag,
            "commit": pin.commit,
            "sdist": pin.sdist_filename,
            "sha256": pin.sdist_sha256,
        },
        "target": str(args.target),
        "built": state is not None,
        "source": state.source if state else None,
        "base": state.base if state else None,
        "up_to_date": bool(current and state.complete),
        "patches": rows,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pin:    vLLM {pin.version} ({pin.tag}, commit {pin.commit})")
    if state:
        print(
            f"tree:   {args.target}, base {state.base[:12]} from {state.source}"
            f"{'' if info['up_to_date'] else ' (out of date: run apply.py)'}"
        )
    else:
        print(f"tree:   {args.target} not built (run apply.py)")
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        print(f"  {r['state']:<8} {r['name']:<{width}}  {r['status']:<10} {r['upstream']}")
    return 0


def configure_export(parser) -> None:
    _target_arg(parser)
    parser.add_argument(
        "--range",
        dest="revision_range",
        help=f"commits to export (default: {BASE_TAG}..HEAD, i.e. what is checked out)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 10 if patches/ differs from the tree",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="export even over patch files or a pin changed since the last build",
    )


EXPORT_DOC = """\
Rewrite patches/ from the built tree.

Formats each commit of vllm-base..HEAD (normally the branch `patched`; after a
failed build, `moepatch/failed` once you have fixed it there) with fixed
settings (`git format-patch --zero-commit --full-index --no-signature --no-stat
--keep-subject`), names it after its `Patch-Filename:` trailer (a commit made by
hand: the patch file with the same subject, else a slug of the subject),
removes that trailer, deletes the old patch files and rewrites patches/series
in commit order, keeping its leading comment. apply then export reproduces
patches/ byte for byte.

Refused while a build of TARGET runs (exit 9) or after one was killed (exit 8:
run apply.py to finish it), and when patches/ or vllm.pin changed since TARGET
was built (exit 10), since export would overwrite those edits: build them
first, or pass --force. After a failed build it exports what is checked out.
"""


def run_export(args) -> int:
    if args.check:
        export.check_drift(args.target, args.patches)
        print(f"{args.patches}: matches {args.target}")
        return 0
    with ownership.locked(args.target):
        if ownership.interrupted(args.target):
            raise TargetError(
                f"{args.target}: holds a build that was interrupted; "
                "run `python apply.py` to finish it, then export"
            )
        if not args.force:
            _refuse_unbuilt_edits(args)
        names = export.export(args.target, args.patches, args.revision_range)
    for name in names:
        print(f"wrote patches/{name}")
    return 0


def _refuse_unbuilt_edits(args) -> None:
    """Export rewrites patches/ from the tree: edits made to patches/ or the pin
    since the tree was built would be lost. After a failed build the files
    are expected to differ (the fix is made in the tree)."""
    state = read_state(args.target) if gitutil.is_repo(args.target) else None
    if state is None or state.failed:
        return
    try:
        current = state.built_from(args.pin.read_bytes(), read_series(args.patches))
    except (OSError, SeriesError):
        current = False
    if not current:
        raise DriftError(
            f"{args.patches}: changed since {args.target} was built (or vllm.pin did); "
            "export would overwrite those edits",
            "run `python apply.py` to build them first, or pass --force to export anyway",
        )


CHECK_DOC = """\
Lint the series and prove it, without touching the built tree.

Fails (exit 4) when a listed file is missing, a patch file is not listed, a
file is not `git format-patch` text, or a header lacks a description, an
`Upstream:` trailer (PR URL or 'not yet'), a known `Status:` or a `Tests:`
trailer; a series that lists a name twice stops it at once (exit 13). Then
applies the series in a scratch tree from the cached base, checks that every
`Tests:` path exists there, and that export reproduces patches/ byte for byte
(exit 10 when it does not).
"""


def configure_check(parser) -> None:
    add_source_argument(parser)


def run_check(args) -> int:
    report = check(args.pin, args.patches, args.source)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    if report.problems:
        drift_only = all("differs from what" in p for p in report.problems)
        error = DriftError if drift_only else SeriesError
        raise error(f"check found {len(report.problems)} problem(s) in {args.patches}")
    print(f"{args.patches}: {len(report.applied)} patches lint clean, apply, and round-trip")
    return 0
