"""The build target as the tool's own: its lock, and taking it back after a kill.

The lock is a `flock` on the target directory itself, so no lock file is ever
written anywhere; the kernel drops it when its holder ends, however it ends.

While a build writes into the tree, `.git/moepatch/building` says so. It is
written before the build's first byte in the target (before `git init` of a
new one) and removed once the build's outcome is recorded. A run that finds it
knows the tree holds the tool's own unfinished work, not the user's (the user's
was refused or saved before the marker was written): it clears what the killed
git commands left behind and builds again, without --force.
"""

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import LockedError, TargetError


@contextmanager
def locked(target: Path):
    """Hold the target's lock; a second run refuses at once (exit 9).

    A target that does not exist is created empty to hold the lock, and removed
    again if the run leaves it empty (an empty target counts as new).
    """
    target = Path(target)
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise TargetError(f"{target}: cannot use as the target: {e.strerror or e}") from None
    acquired = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{target}: another apply.py run is building it; try again when it ends"
            ) from None
        acquired = True
        yield
    finally:
        # Only the holder removes the directory, and while it still holds the
        # lock: two runs may both have found it missing, and the one refused
        # must not remove it from under the one building.
        if created and acquired:
            try:
                target.rmdir()
            except OSError:
                pass  # not empty: the run wrote a tree
        os.close(handle)  # releases the lock


def marker_path(target: Path) -> Path:
    return Path(target) / ".git" / "moepatch" / "building"


def interrupted(target: Path) -> bool:
    """True when a build of this target started and never recorded its outcome."""
    return marker_path(target).is_file()


def begin(target: Path) -> None:
    """Mark the target as being built, before anything else is written into it."""
    marker = marker_path(target)
    marker.parent.mkdir(parents=True, exist_ok=True)
    partial = marker.with_name("building.tmp")
    partial.write_text(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    partial.replace(marker)


def end(target: Path) -> None:
    marker_path(target).unlink(missing_ok=True)


def clear_leftovers(target: Path) -> None:
    """Remove what git commands killed mid-way leave: lock files and an unfinished `git am`.

    Only called holding the target's lock on a tree marked as being built, so
    no git command of ours is running there.
    """
    git_dir = Path(target) / ".git"
    shutil.rmtree(git_dir / "rebase-apply", ignore_errors=True)
    for stale in [*git_dir.glob("*.lock"), *git_dir.glob("refs/**/*.lock")]:
        stale.unlink(missing_ok=True)


def move_contents_aside(target: Path) -> Path:
    """Move everything in a foreign target to TARGET.backup-<time>; keep the (locked) directory."""
    aside = target.with_name(f"{target.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for entry in sorted(target.iterdir()):
        entry.replace(aside / entry.name)
    return aside
