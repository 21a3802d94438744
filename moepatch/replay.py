"""Applying one patch with ``git am --3way`` and classifying the result.

Shared by ``rebase`` (which replays a series), ``matrix`` and ``upstream``
(which try single patches in scratch repositories).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import gitutil
from .build import am_3way, describe_conflict, with_filename_trailer
from .series import Patch

CLEAN, THREE_WAY, CONFLICT, UPSTREAMED = "clean", "3-way", "conflict", "upstreamed"


@dataclass
class Outcome:
    status: str  # clean, 3-way, conflict, upstreamed
    details: list[str] = field(default_factory=list)


def am_in_progress(repo: Path) -> bool:
    return (Path(repo) / ".git" / "rebase-apply").exists()


def conflict_hunks(repo: Path) -> list[str]:
    """`path:line` of every conflict marker left in unmerged files."""
    hunks = []
    status = gitutil.out(repo, "status", "--porcelain=v1", "--untracked-files=no")
    for line in status.splitlines():
        if line[:2] in ("DU", "UD"):
            hunks.append(
                f"{line[3:]}: changed by the patch, "
                f"{'absent from' if line[:2] == 'DU' else 'deleted by'} "
                "the release (modify/delete)"
            )
    names = gitutil.out(repo, "diff", "--name-only", "--diff-filter=U")
    for name in names.splitlines():
        try:
            lines = (Path(repo) / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for number, line in enumerate(lines.splitlines(), 1):
            if line.startswith("<<<<<<< "):
                hunks.append(f"{name}:{number}: conflict hunk")
    return hunks


def apply_mbox(repo: Path, mbox: Path, keep_conflict: bool = False) -> Outcome:
    """Apply one mbox at HEAD with `git am --3way` and classify what happened.

    upstreamed: the patch does not apply forward but applies in reverse, or
    the 3-way merge leaves nothing to commit. clean: `git apply --check`
    accepts it as is. 3-way: only the 3-way merge applies it. conflict: the
    merge stopped; with keep_conflict the `git am` session stays open for
    the user, otherwise it is aborted.
    """
    forward = gitutil.run(repo, "apply", "--check", str(mbox), check=False)[0] == 0
    if not forward:
        reverse = gitutil.run(repo, "apply", "--check", "-R", str(mbox), check=False)
        if reverse[0] == 0:
            why = "the release already has this change (the patch applies in reverse)"
            return Outcome(UPSTREAMED, [why])
    head = gitutil.rev(repo, "HEAD")
    applied, output = am_3way(repo, mbox)
    if not applied:
        details = describe_conflict(repo, output) + conflict_hunks(repo)
        details = [d for d in details if d != "Failed to merge in the changes."]
        if not keep_conflict:
            gitutil.run(repo, "am", "--abort", check=False)
            gitutil.run(repo, "reset", "-q", "--hard", head)
        return Outcome(CONFLICT, list(dict.fromkeys(details)))
    if gitutil.rev(repo, "HEAD") == head:
        why = "the 3-way merge left nothing to commit (the release already has it)"
        return Outcome(UPSTREAMED, [why])
    return Outcome(CLEAN if forward else THREE_WAY)


def write_mbox(patch: Patch, directory: Path) -> Path:
    """The patch as `apply` feeds it to git am (with its Patch-Filename trailer)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / patch.name
    path.write_bytes(with_filename_trailer(patch))
    return path
