"""``apply.py matrix``: which patch applies to which vLLM release, and how.

For every release (default: the pinned one and the two releases before it on
the package index) each patch is tried twice on the pristine release tree:

- alone:  the release plus only that patch;
- series: the release plus the patches before it, in series order (a patch
          that conflicts or is upstreamed is left out and the next one goes on).

Each try is classified as in ``rebase``: ``clean`` (``git apply`` takes it as
is), ``3-way`` (only a 3-way merge applies it), ``conflict`` or
``upstreamed`` (it applies in reverse, or the merge leaves nothing to commit).

Every release tree comes from the same verified, cached sources as ``apply``
(a re-run needs no download and no index listing). The tries run in a
throwaway repository that borrows the cached bases' objects (git alternates),
so nothing is copied and the built tree is never touched. ``--write DIR``
stores the result as ``matrix.json`` and ``matrix.md`` (the committed copy
lives in ``results/``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import gitutil, index, logger
from .cache import cache_root
from .errors import NetworkError, ToolError
from .pin import Pin, load_pin
from .release import resolve_release
from .replay import CONFLICT, UPSTREAMED, apply_mbox, write_mbox
from .series import read_series
from .source import Base, add_source_argument, resolve_base

_FINAL = re.compile(r"^vllm-(\d+(?:\.\d+)+)\.tar\.gz$")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def sdist_versions() -> list[str]:
    """Final vLLM releases with an sdist on pip's configured indexes, oldest first.

    The listing is remembered in the cache; offline, the remembered one is used.
    """
    record = cache_root() / "releases" / "sdist-versions.json"
    versions: set[str] = set()
    try:
        for f in index.list_files("vllm"):
            m = _FINAL.match(f.filename)
            if m:
                versions.add(m.group(1))
    except NetworkError as e:
        error = str(e)
    else:
        error = "no vllm sdists listed"
    if versions:
        ordered = sorted(versions, key=_key)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(ordered) + "\n")
        return ordered
    if record.is_file():
        return json.loads(record.read_text())
    raise NetworkError(error)


def default_releases(pin: Pin, count: int = 2) -> list[str]:
    """The pinned version and the `count` final releases before it."""
    try:
        older = [v for v in sdist_versions() if _key(v) < _key(pin.version)]
    except (NetworkError, ValueError) as e:
        logger.warning("no release listing (%s); trying only the pinned release", e)
        older = []
    return [pin.version, *reversed(older[-count:])]


def _objects(repo: Path) -> Path:
    repo = Path(repo)
    return repo / "objects" if (repo / "objects").is_dir() else repo / ".git" / "objects"


def _scratch_for(bases: list[Base], where: Path) -> Path:
    """A repository at `where` that sees every base's objects without copying them."""
    where.mkdir(parents=True, exist_ok=True)
    gitutil.run(where, "init", "-q")
    alternates = where / ".git" / "objects" / "info" / "alternates"
    alternates.parent.mkdir(parents=True, exist_ok=True)
    alternates.write_text("".join(f"{_objects(b.repo)}\n" for b in bases))
    return where


def _try(repo: Path, base: str, mboxes: list[tuple[str, Path]], series: bool):
    """{name: (status, details)} for each mbox, alone or stacked."""
    out = {}
    gitutil.run(repo, "checkout", "-q", "-f", "--detach", base)
    gitutil.run(repo, "clean", "-q", "-fdx")
    for name, mbox in mboxes:
        if not series:
            gitutil.run(repo, "reset", "-q", "--hard", base)
        outcome = apply_mbox(repo, mbox, keep_conflict=False)
        out[name] = (outcome.status, outcome.details)
    return out


def compute(
    pin_path: Path,
    patches_dir: Path,
    releases: list[str] | None = None,
    source: str = "auto",
) -> dict:
    """The matrix as a JSON-ready dict."""
    start = time.monotonic()
    pin = load_pin(pin_path)
    patches = read_series(patches_dir)
    releases = releases or default_releases(pin)
    pinned_base = resolve_base(pin, source)
    resolved: list[tuple[str, Pin, Base]] = []
    for spec in releases:
        if spec == pin.version:
            resolved.append((spec, pin, pinned_base))
        else:
            kind = source if source in ("auto", "git", "sdist") else "sdist"
            rel_pin, base = resolve_release(spec, pin, kind)
            resolved.append((spec, rel_pin, base))
    scratch = Path(tempfile.mkdtemp(prefix="matrix-", dir=_tmp_root()))
    try:
        mboxes = [(p.name, write_mbox(p, scratch / "mbox")) for p in patches]
        repo = _scratch_for([pinned_base, *[b for _, _, b in resolved]], scratch / "repo")
        # The pinned series first: its commits hold the blobs that later patches'
        # `index` lines name, which a 3-way merge on another release needs (as
        # in rebase, where the old series is built first).
        _try(repo, pinned_base.commit, mboxes, series=True)
        results = {p.name: {} for p in patches}
        rows = []
        for _spec, rel_pin, base in resolved:
            alone = _try(repo, base.commit, mboxes, series=False)
            stacked = _try(repo, base.commit, mboxes, series=True)
            for name, per_release in results.items():
                per_release[rel_pin.version] = {
                    "alone": alone[name][0],
                    "series": stacked[name][0],
                    "details": {"alone": alone[name][1], "series": stacked[name][1]},
                }
            rows.append(
                {
                    "version": rel_pin.version,
                    "pinned": rel_pin.version == pin.version,
                    "sdist": rel_pin.sdist_filename,
                    "sha256": rel_pin.sdist_sha256,
                    "commit": rel_pin.commit,
                    "base": base.commit,
                }
            )
            logger.info("tried %d patch(es) on vLLM %s", len(patches), rel_pin.version)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "pin": pin.version,
        "releases": rows,
        "patches": [p.name for p in patches],
        "results": results,
        "seconds": round(time.monotonic() - start, 1),
    }


def _tmp_root() -> Path:
    root = cache_root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cell(entry: dict) -> str:
    return (
        entry["alone"]
        if entry["alone"] == entry["series"]
        else (f"{entry['alone']} / {entry['series']}")
    )


LEGEND = (
    "Cell: result alone / result in series order (one word when both agree). "
    "clean: applies as is; 3-way: needs a 3-way merge; conflict: does not "
    "apply; upstreamed: the release already has the change."
)


def format_table(matrix: dict) -> str:
    versions = [r["version"] + (" (pinned)" if r["pinned"] else "") for r in matrix["releases"]]
    rows = [["patch", *versions]]
    for name in matrix["patches"]:
        cells = [_cell(matrix["results"][name][r["version"]]) for r in matrix["releases"]]
        rows.append([name, *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def format_markdown(matrix: dict) -> str:
    head = ["patch"]
    for r in matrix["releases"]:
        head.append(f"{r['version']}{' (pinned)' if r['pinned'] else ''}")
    lines = [
        "# Patch × release matrix",
        "",
        "Generated by `python apply.py matrix --write results` (do not edit).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in matrix["patches"]:
        cells = [_cell(matrix["results"][name][r["version"]]) for r in matrix["releases"]]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", LEGEND, "", "Releases (sdists from the package index, sha256-verified):", ""]
    for r in matrix["releases"]:
        lines.append(
            f"- {r['version']}: `{r['sdist']}` sha256 `{r['sha256']}`, "
            f"upstream commit `{r['commit']}`"
        )
    problems = []
    for name in matrix["patches"]:
        for r in matrix["releases"]:
            entry = matrix["results"][name][r["version"]]
            for how in ("alone", "series"):
                if entry[how] in (CONFLICT, UPSTREAMED) and entry["details"][how]:
                    details = "; ".join(entry["details"][how])
                    problems.append(f"- `{name}` on {r['version']} ({how}): {details}")
    if problems:
        lines += ["", "Details:", "", *dict.fromkeys(problems)]
    return "\n".join(lines) + "\n"


def write(matrix: dict, directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in matrix.items() if k != "seconds"}  # stable bytes
    json_path, md_path = directory / "matrix.json", directory / "matrix.md"
    json_path.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(matrix), encoding="utf-8")
    return [json_path, md_path]


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

MATRIX_DOC = "Show which patch applies to which vLLM release.\n\n" + __doc__.split("\n\n", 1)[
    1
].replace("``", "`")


def configure_matrix(parser) -> None:
    parser.add_argument(
        "--releases",
        metavar="V1,V2,...",
        help="comma-separated versions (or sdist paths); default: the "
        "pinned release and the two before it on the index",
    )
    add_source_argument(
        parser,
        help="where the pinned release comes from (default: auto); "
        "other releases come from the index's sdists",
    )
    parser.add_argument(
        "--write", type=Path, metavar="DIR", help="also write DIR/matrix.json and DIR/matrix.md"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_matrix(args) -> int:
    releases = [r.strip() for r in (args.releases or "").split(",") if r.strip()]
    if not read_series(args.patches):
        raise ToolError(f"{args.patches / 'series'} lists no patches")
    matrix = compute(args.pin, args.patches, releases or None, args.source)
    if args.write:
        for path in write(matrix, args.write):
            logger.info("wrote %s", path)
    if args.json:
        print(json.dumps(matrix, indent=2))
    else:
        print(format_table(matrix), end="")
        print(f"\n{LEGEND}\n({matrix['seconds']} s)")
    return 0  # the matrix is a report: conflicts are data, not failures
