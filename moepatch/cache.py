"""Where downloads and pristine base repositories are kept between runs.

Several runs may share one cache (two CI jobs on one machine). Whoever writes
an entry holds that entry's lock (`filelock`, under `locks/`), works in a
scratch directory under `tmp/`, and publishes the finished entry with one
rename: a reader never sees a partial entry, and an entry in use is never
replaced. A killed writer leaves only scratch, which the next holder of the
same lock removes.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from . import logger
from .errors import CacheError

CACHE_ENV = "VLLM_MOE_PATCHES_CACHE"


def cache_root() -> Path:
    """The user cache dir: $VLLM_MOE_PATCHES_CACHE, else $XDG_CACHE_HOME/vllm-moe-patches."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "vllm-moe-patches"


def cache_dir(*parts: str) -> Path:
    """A directory in the cache, created if needed."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create cache directory {path}: {e.strerror or e}") from None
    return path


@contextmanager
def cache_lock(entry: str):
    """Hold the lock of one cache entry; wait while another run holds it."""
    path = cache_dir("locks") / f"{entry}.lock"
    lock = FileLock(path)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another run to finish writing %s to the cache", entry)
            lock.acquire()
    except OSError as e:
        raise CacheError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def scratch(entry: str) -> Path:
    """A fresh scratch directory for `entry`; call it holding `cache_lock(entry)`.

    Scratch of the same entry left by a killed run is removed first: only the
    lock holder writes there.
    """
    tmp = cache_dir("tmp")
    for stale in tmp.glob(f"{entry}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{entry}-", dir=tmp))


def publish(entry: str, built: Path, final: Path) -> None:
    """Move a finished entry into place with one rename; call it holding the entry's lock.

    Whatever is at `final` (a broken or outdated entry, never one in use) is
    moved out of the way and deleted first.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{entry}-old-", dir=cache_dir("tmp")))
            final.replace(old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        built.replace(final)
    except OSError as e:
        raise CacheError(f"cannot publish {final} in the cache: {e.strerror or e}") from None
