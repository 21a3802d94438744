"""Turn the commits of a built tree back into patches/ (wipe, then write).

Export is the inverse of build: applying patches/ and exporting reproduces
every file byte for byte, because both sides run git with the same fixed
settings (see gitutil) and the `Patch-Filename:` trailer that build adds is
removed here.
"""

import re
import shutil
import tempfile
from pathlib import Path

from . import gitutil, logger, testseam
from .errors import DriftError, SeriesError, ToolError
from .layout import BASE_TAG, FILENAME_TRAILER
from .series import Patch, mail_subject, parse_patch, series_entry

FORMAT_PATCH = (
    "format-patch",
    "--zero-commit",
    "--full-index",
    "--no-signature",
    "--no-stat",
    "--keep-subject",
    "--no-numbered",
    "--no-cover-letter",
    "--encode-email-headers",
)
_TRAILER_LINE = re.compile(rf"^{FILENAME_TRAILER}: (\S+)\n", re.M)


def _untagged(subject: str) -> str:
    """A subject without its leading [tags] (plain `git am` drops them)."""
    return re.sub(r"^(\s*\[[^\]]*\])+\s*", "", subject).strip()


def _slug(subject: str) -> str:
    words = re.sub(r"\[[^\]]*\]", "", subject).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")[:52] + ".patch"


def render(
    target: Path, revision_range: str, known: dict[str, str] | None = None
) -> list[tuple[str, bytes]]:
    """(file name, bytes) for each commit of the range, oldest first.

    A commit's file name comes from its `Patch-Filename:` trailer; a commit
    without one (made by hand in the tree) takes the name of the known patch
    with the same subject (`known`: subject -> file name), else a slug of its
    subject.
    """
    scratch = Path(tempfile.mkdtemp(prefix="moepatch-export-"))
    try:
        gitutil.run(target, *FORMAT_PATCH, "-o", str(scratch), revision_range)
        result = []
        for path in sorted(scratch.glob("*.patch")):
            text = path.read_text(encoding="utf-8")
            match = _TRAILER_LINE.search(text)
            if match:
                name = match.group(1)
                text = text[: match.start()] + text[match.end() :]
            else:
                subject = mail_subject(text)
                name = (known or {}).get(_untagged(subject)) or _slug(subject)
            result.append((name, text.encode("utf-8")))
        names = [n for n, _ in result]
        if len(set(names)) != len(names):
            raise ToolError(f"two commits in {revision_range} export to the same file name")
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def known_names(patches_dir: Path) -> dict[str, str]:
    """Subject -> file name of the patch files now in patches/."""
    parsed = []
    for path in sorted(Path(patches_dir).glob("*.patch")):
        try:
            parsed.append(parse_patch(path.name, path))
        except SeriesError:
            continue
    return names_by_subject(parsed)


def names_by_subject(patches: list[Patch]) -> dict[str, str]:
    """Subject -> file name of these patches (what `render` calls `known`)."""
    return {_untagged(p.subject): p.name for p in patches}


def series_text(old: str | None, names: list[str]) -> str:
    """The series file listing `names`: the old file itself when it lists the
    same names in the same order (its comments and blank lines kept), else the
    old file's leading comment and then the names."""
    if old is not None and [e for e in map(series_entry, old.splitlines()) if e] == names:
        return old
    header = []
    for line in (old or "").splitlines():
        if series_entry(line):
            break
        header.append(line)
    return "".join(f"{line}\n" for line in [*header, *names])


def drift(patches_dir: Path, rendered: list[tuple[str, bytes]]) -> list[str]:
    """Files of patches/ that differ from the rendered series (or are extra/missing)."""
    patches_dir = Path(patches_dir)
    drifted = []
    wanted = dict(rendered)
    for name, data in rendered:
        path = patches_dir / name
        if not path.is_file() or path.read_bytes() != data:
            drifted.append(name)
    for path in sorted(patches_dir.glob("*.patch")):
        if path.name not in wanted:
            drifted.append(path.name)
    series = patches_dir / "series"
    old = series.read_text(encoding="utf-8") if series.is_file() else None
    if old != series_text(old, [n for n, _ in rendered]):
        drifted.append("series")
    return drifted


def export(target: Path, patches_dir: Path, revision_range: str | None = None) -> list[str]:
    """Rewrite patches/ from the built tree; return the names written."""
    target, patches_dir = Path(target), Path(patches_dir)
    if not gitutil.is_repo(target) or not gitutil.rev(target, BASE_TAG):
        raise ToolError(f"{target}: not a tree built by apply.py (no '{BASE_TAG}' tag)")
    revision_range = revision_range or f"{BASE_TAG}..HEAD"
    rendered = render(target, revision_range, known_names(patches_dir))
    series = patches_dir / "series"
    old = series.read_text(encoding="utf-8") if series.is_file() else None
    patches_dir.mkdir(parents=True, exist_ok=True)
    for leftover in patches_dir.glob(".*.partial"):
        leftover.unlink()  # from a killed export
    stale = set(patches_dir.glob("*.patch"))
    # Each file is replaced whole and old ones go last, so a killed export
    # loses nothing: the tree still holds every patch and a re-run finishes.
    for name, data in rendered:
        _write_atomic(patches_dir / name, data)
        stale.discard(patches_dir / name)
        testseam.point("export")
    _write_atomic(series, series_text(old, [n for n, _ in rendered]).encode("utf-8"))
    for path in stale:
        path.unlink()
    logger.info("exported %d patch(es) from %s", len(rendered), revision_range)
    return [n for n, _ in rendered]


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def check_drift(target: Path, patches_dir: Path) -> None:
    if not gitutil.is_repo(target) or not gitutil.rev(target, BASE_TAG):
        raise ToolError(f"{target}: not a tree built by apply.py (no '{BASE_TAG}' tag)")
    drifted = drift(patches_dir, render(target, f"{BASE_TAG}..HEAD", known_names(patches_dir)))
    if drifted:
        raise DriftError(
            f"{patches_dir}: differs from the built tree: {', '.join(drifted)}",
            "run `python apply.py export` to rewrite patches/ from the tree",
        )
