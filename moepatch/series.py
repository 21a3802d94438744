"""patches/series and the patch files it lists.

The series file is the only authority on order: one file name per line, blank
lines and `#` comments ignored. Patches are `git format-patch` text; their
commit messages end in trailers (`Upstream:`, `Status:`, `Related:`, `Tests:`).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DuplicateEntryError, MissingPatchError, NotAPatchError, SeriesError

STATUSES = ("pending", "submitted", "accepted", "backport", "inappropriate", "denied")
_TRAILER = re.compile(r"^([A-Za-z][A-Za-z0-9-]*): (.+)$")


@dataclass
class Patch:
    name: str
    path: Path
    data: bytes
    author: str
    date: str
    subject: str
    body: str
    trailers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def upstream(self) -> str:
        return (self.trailers.get("Upstream") or ["(none)"])[-1]

    @property
    def status(self) -> str:
        return (self.trailers.get("Status") or ["(none)"])[-1]

    @property
    def tests(self) -> list[str]:
        return self.trailers.get("Tests", [])

    @property
    def text(self) -> str:
        # parse_patch refused anything that is not UTF-8.
        return self.data.decode("utf-8")

    def touched_files(self) -> list[str]:
        return re.findall(r"^diff --git a/(\S+) b/\S+$", self.text, flags=re.M)


def series_entry(line: str) -> str:
    """The patch name a line of patches/series lists: what precedes a `#`
    comment, stripped ('' for a blank or comment-only line)."""
    return line.split("#", 1)[0].strip()


def read_series_names(patches_dir: Path) -> list[str]:
    series = Path(patches_dir) / "series"
    if not series.is_file():
        raise SeriesError(f"{series}: series file not found")
    try:
        text = series.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SeriesError(f"{series}: not UTF-8 text (byte {e.start})") from None
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = series_entry(line)
        if not entry:
            continue
        if entry in names:
            raise DuplicateEntryError(f"{series}:{lineno}: '{entry}' is listed twice")
        if "/" in entry or entry.startswith("."):
            raise SeriesError(f"{series}:{lineno}: '{entry}' is not a plain file name")
        names.append(entry)
    return names


def message_of(mail_body: str) -> str:
    """The commit message part of a mail body: what `git am` keeps."""
    end = len(mail_body)
    for marker in ("\n---\n", "\ndiff --git "):
        at = mail_body.find(marker)
        if at != -1:
            end = min(end, at)
    return mail_body[:end]


def _unfold(header_lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for line in header_lines:
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            headers[last] = value.strip()
    return headers


def mail_subject(text: str) -> str:
    """The (unfolded) Subject: header of `git format-patch` text."""
    header_lines = text.split("\n\n", 1)[0].split("\n")[1:]
    return _unfold(header_lines).get("Subject", "")


def parse_patch(name: str, path: Path) -> Patch:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingPatchError(f"{path}: listed in series but missing") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotAPatchError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    if not lines[0].startswith("From ") or "\ndiff --git " not in text:
        raise NotAPatchError(f"{path}: not a git format-patch file")
    try:
        blank = lines.index("")
    except ValueError:
        raise NotAPatchError(f"{path}: no blank line after the mail headers") from None
    headers = _unfold(lines[1:blank])
    for key in ("From", "Date", "Subject"):
        if not headers.get(key):
            raise NotAPatchError(f"{path}: missing '{key}:' header")
    message = message_of("\n".join(lines[blank + 1 :]))
    # `git am` drops a carriage return at the end of every line (an editor's
    # or a checkout's CRLF conversion, or a file's own), so such a patch
    # would build something other than what it says.
    for lineno, line in enumerate(lines, 1):
        if line.endswith("\r"):
            raise NotAPatchError(
                f"{path}:{lineno}: CRLF line ending, which `git am` would drop "
                "(git format-patch writes LF)"
            )
    paragraphs = message.strip("\n").split("\n\n")
    trailers: dict[str, list[str]] = {}
    body = message.strip("\n")
    if paragraphs and all(_TRAILER.match(ln) for ln in paragraphs[-1].splitlines()):
        for ln in paragraphs[-1].splitlines():
            key, value = _TRAILER.match(ln).groups()
            trailers.setdefault(key, []).append(value.strip())
        body = "\n\n".join(paragraphs[:-1])
    return Patch(
        name=name,
        path=path,
        data=data,
        author=headers["From"],
        date=headers["Date"],
        subject=headers["Subject"],
        body=body,
        trailers=trailers,
    )


def unlisted_patches(patches_dir: Path, names: list[str]) -> list[str]:
    """Patch files in patches/ that the series does not list."""
    return sorted(p.name for p in Path(patches_dir).glob("*.patch") if p.name not in names)


def read_series(patches_dir: Path) -> list[Patch]:
    """Parse patches/series and every patch it lists, in order.

    A patch file that the series does not list is an error too: it is
    usually one somebody forgot to add, and applying without it would
    silently build something else.
    """
    patches_dir = Path(patches_dir)
    names = read_series_names(patches_dir)
    unlisted = unlisted_patches(patches_dir, names)
    if unlisted and not names:
        raise SeriesError(
            f"{patches_dir / 'series'}: lists no patches, but {patches_dir} holds "
            f"{len(unlisted)} ({unlisted[0]}{', ...' if len(unlisted) > 1 else ''})",
            "list them in the series, in order (or delete them)",
        )
    if unlisted:
        raise SeriesError(
            f"{patches_dir / unlisted[0]}: not listed in {patches_dir / 'series'}",
            "add it to the series (or delete it)",
        )
    return [parse_patch(n, patches_dir / n) for n in names]


def header_problems(patch: Patch) -> list[str]:
    """What a reviewer would reject in a patch header, as messages naming the field."""
    problems = []
    if not patch.body.strip():
        problems.append("no description between Subject and the diff")
    upstream = patch.trailers.get("Upstream")
    if not upstream:
        problems.append("missing 'Upstream:' trailer (a PR URL or 'not yet')")
    elif upstream[-1] != "not yet" and not upstream[-1].startswith("https://"):
        problems.append(f"malformed 'Upstream: {upstream[-1]}' (a PR URL or 'not yet')")
    status = patch.trailers.get("Status")
    if not status:
        problems.append("missing 'Status:' trailer")
    elif not status[-1].split() or status[-1].split()[0] not in STATUSES:
        problems.append(f"unknown 'Status: {status[-1]}' (one of {', '.join(STATUSES)})")
    elif status[-1].split()[0] in ("submitted", "accepted") and not (
        upstream and upstream[-1].startswith("https://")
    ):
        problems.append(f"'Status: {status[-1]}' needs an 'Upstream:' PR URL")
    if not patch.tests:
        problems.append("no 'Tests:' trailer naming the tests that cover it")
    for ln in patch.text.split("\n"):
        if ln.startswith("+") and not ln.startswith("+++") and ln != ln.rstrip():
            problems.append("trailing whitespace on an added line")
            break
    return problems
