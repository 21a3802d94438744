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

from . import gitutil, logger
from .build import BASE_TAG, BRANCH, FILENAME_TRAILER
from .errors import DriftError, ToolError

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


def _slug(subject: str) -> str:
    words = re.sub(r"\[[^\]]*\]", "", subject).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")[:52] + ".patch"


def render(target: Path, revision_range: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) for each commit of the range, oldest first."""
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
                subject = re.search(r"^Subject: (.*)$", text, re.M).group(1)
                name = _slug(subject)
            result.append((name, text.encode("utf-8")))
        names = [n for n, _ in result]
        if len(set(names)) != len(names):
            raise ToolError(f"two commits in {revision_range} export to the same file name")
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def series_text(old: str | None, names: list[str]) -> str:
    """The series file listing `names`, keeping the old file's leading comment."""
    header = []
    for line in (old or "").splitlines():
        if line.split("#", 1)[0].strip():
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
    revision_range = revision_range or f"{BASE_TAG}..{BRANCH}"
    rendered = render(target, revision_range)
    series = patches_dir / "series"
    old = series.read_text(encoding="utf-8") if series.is_file() else None
    for path in patches_dir.glob("*.patch"):
        path.unlink()
    patches_dir.mkdir(parents=True, exist_ok=True)
    for name, data in rendered:
        (patches_dir / name).write_bytes(data)
    series.write_text(series_text(old, [n for n, _ in rendered]), encoding="utf-8")
    logger.info("exported %d patch(es) from %s", len(rendered), revision_range)
    return [n for n, _ in rendered]


def check_drift(target: Path, patches_dir: Path) -> None:
    drifted = drift(patches_dir, render(target, f"{BASE_TAG}..{BRANCH}"))
    if drifted:
        raise DriftError(
            f"{patches_dir}: differs from the built tree: {', '.join(drifted)}",
            "run `python apply.py export` to rewrite patches/ from the tree",
        )
