"""Where the pristine vLLM tree comes from, verified against the pin.

Every source ends as a git repository in the cache holding the pinned release
as one commit (the base):

- git:   a shallow fetch of the pinned tag from the pin's repository; the
         fetched commit must match the pinned commit.
- sdist: the release's source distribution from pip's configured index,
         checked against the pinned sha256 before extraction, extracted with
         tarfile's `data` filter, and committed with a fixed identity and date
         so the base SHA is the same on every machine.
- PATH:  a local git checkout, an extracted tree or an sdist tarball,
         verified the same way.
- auto:  git when the repository answers within a few seconds, else sdist.
"""

import hashlib
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import gitutil, index, logger, testseam
from .cache import cache_lock, cache_root, publish, scratch
from .errors import ArchiveError, NetworkError, ToolError, VerifyError
from .pin import Pin

GIT_PROBE_TIMEOUT_S = 5
# vLLM's own .gitignore hides some release files (vllm/_version.py among them)
# from `git add`; the base adds everything with --force except build metadata.
_EXCLUDED_FROM_BASE = ("*.egg-info",)
_BASE_MARKER = "moepatch-base"


@dataclass(frozen=True)
class Base:
    repo: Path  # a git repository that holds `commit`
    commit: str
    source: str  # "git", "sdist" or "path"
    description: str


def read_version_file(tree: Path) -> tuple[str, str | None]:
    """(version, commit id) recorded in a release tree's vllm/_version.py."""
    path = tree / "vllm" / "_version.py"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerifyError(f"{path}: missing; not a vLLM release tree") from None
    version = re.search(r"^__version__ = version = '([^']+)'", text, re.M)
    commit = re.search(r"^__commit_id__ = commit_id = '([^']*)'", text, re.M)
    if not version:
        raise VerifyError(f"{path}: no __version__ recorded")
    return version.group(1), commit.group(1) if commit else None


def verify_tree(tree: Path, pin: Pin) -> None:
    version, commit = read_version_file(tree)
    if version != pin.version:
        raise VerifyError(
            f"{tree / 'vllm/_version.py'}: version {version}, the pin says {pin.version}"
        )
    if commit and not pin.matches_commit(commit):
        raise VerifyError(
            f"{tree / 'vllm/_version.py'}: commit {commit}, the pin says {pin.commit}"
        )


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz refusing absolute paths, '..' and escaping links.

    Returns the single top-level directory of the archive.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    raise tarfile.FilterError(f"{member.name!r} leaves the tree")
            # The data filter also refuses links that point outside the tree
            # and strips owners and special permission bits.
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as e:
        raise ArchiveError(f"{archive}: unsafe member refused: {e}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{archive}: cannot extract: {e}") from None
    entries = [p for p in dest.iterdir()]
    if len(entries) != 1 or not entries[0].is_dir():
        raise ArchiveError(f"{archive}: expected one top-level directory")
    return entries[0]


def _commit_tree(tree: Path, message: str) -> str:
    gitutil.run(tree, "init", "-q")
    excludes = [f":(exclude,glob)**/{p}" for p in _EXCLUDED_FROM_BASE]
    gitutil.run(tree, "add", "--force", "--all", "--", ".", *excludes)
    testseam.point("base-commit")
    env = gitutil.env_for(gitutil.BASE_AUTHOR, gitutil.BASE_DATE)
    gitutil.run(tree, "commit", "-q", "--allow-empty", "-m", message, env=env)
    return gitutil.rev(tree, "HEAD")


def _cached_base(key: str, pin: Pin, source: str, label: str) -> Base | None:
    """The cached base `key`, verified against the pin as a new one would be.

    The key is the source's hash; the pin's version and commit are checked
    again on every use, so a pin edited to another release is refused whether
    or not the old release is cached.
    """
    repo = cache_root() / "base" / key
    marker = repo / ".git" / _BASE_MARKER
    if marker.is_file():
        commit = marker.read_text().strip()
        if gitutil.rev(repo, commit) == commit:
            verify_tree(repo, pin)
            return Base(repo, commit, source, label)
    return None


def _make_base(key: str, pin: Pin, label: str, source: str, unpack) -> Base:
    """The cached base `key`, made once under its cache lock if missing.

    `unpack(scratch)` writes the release tree into a scratch directory and
    returns it; it is verified, committed there, and published whole.
    """
    cached = _cached_base(key, pin, source, label)
    if cached:
        return cached
    entry, final = f"base-{key}", cache_root() / "base" / key
    with cache_lock(entry):
        cached = _cached_base(key, pin, source, label)  # made while we waited
        if cached:
            return cached
        work = scratch(entry)
        try:
            tree = unpack(work)
            testseam.point("extract")
            verify_tree(tree, pin)
            message = (
                f"vLLM {pin.version}\n\n"
                f"Pristine release tree from {label}, committed by vllm-moe-patches.\n"
                f"Upstream tag {pin.tag}, commit {pin.commit}. Build metadata "
                f"({', '.join(_EXCLUDED_FROM_BASE)}) left out.\n"
            )
            commit = _commit_tree(tree, message)
            (tree / ".git" / _BASE_MARKER).write_text(commit + "\n")
            publish(entry, tree, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Base(final, commit, source, label)


def base_from_tarball(archive: Path, pin: Pin, label: str, source: str) -> Base:
    sha = index.sha256_file(archive)
    if sha != pin.sdist_sha256:
        raise VerifyError(f"{archive}: sha256 {sha}, the pin says {pin.sdist_sha256}")
    return _make_base(f"sdist-{sha}", pin, label, source, lambda work: safe_extract(archive, work))


def base_from_sdist(pin: Pin) -> Base:
    label = f"sdist {pin.sdist_filename}"
    cached = _cached_base(f"sdist-{pin.sdist_sha256}", pin, "sdist", label)
    if cached:
        return cached
    found = index.find_file("vllm", pin.sdist_filename)
    archive = index.fetch(found, pin.sdist_sha256)
    return base_from_tarball(archive, pin, label, "sdist")


def _git_cache(pin: Pin) -> tuple[str, Path]:
    """(lock entry, path) of the bare repository caching the pin's repository."""
    name = hashlib.sha256(pin.repository.encode()).hexdigest()[:16]
    return f"git-{name}", cache_root() / "git" / f"{name}.git"


def git_reachable(url: str, timeout: float = GIT_PROBE_TIMEOUT_S) -> bool:
    try:
        result = subprocess.run(
            ["git", "ls-remote", "--exit-code", url, "HEAD"],
            capture_output=True,
            timeout=timeout,
            env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return result.returncode == 0


def base_from_git(pin: Pin) -> Base:
    entry, repo = _git_cache(pin)
    with cache_lock(entry):
        if not (repo / "HEAD").exists():
            work = scratch(entry)
            gitutil.run(work, "init", "-q", "--bare")
            publish(entry, work, repo)
        return _fetch_pinned(pin, repo)


def _fetch_pinned(pin: Pin, repo: Path) -> Base:
    ref = f"refs/moepatch/{pin.tag}"
    commit = gitutil.rev(repo, ref)
    if not commit or not pin.matches_commit(commit):
        what = pin.commit if len(pin.commit) == 40 else f"refs/tags/{pin.tag}"
        status, _, err = gitutil.run(
            repo,
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            pin.repository,
            f"+{what}:{ref}",
            check=False,
        )
        if status != 0:
            raise NetworkError(f"git fetch {pin.repository} {what} failed: {err.strip()}")
        commit = gitutil.rev(repo, ref)
    if not pin.matches_commit(commit):
        raise VerifyError(f"{pin.repository} {pin.tag} is {commit}, the pin says {pin.commit}")
    return Base(repo, commit, "git", f"git {pin.repository} {pin.tag} ({commit[:12]})")


def base_from_path(path: Path, pin: Pin) -> Base:
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return base_from_tarball(path, pin, f"tarball {path}", "path")
    if not path.is_dir():
        raise ToolError(f"{path}: no such file or directory")
    if gitutil.is_repo(path):
        for candidate in ("HEAD", pin.commit, f"refs/tags/{pin.tag}"):
            commit = gitutil.rev(path, candidate)
            if commit and pin.matches_commit(commit):
                return Base(path, commit, "path", f"git checkout {path} ({commit[:12]})")
        raise VerifyError(f"{path}: no commit matching the pin ({pin.commit}, {pin.tag})")
    verify_tree(path, pin)
    key = "tree-" + hashlib.sha256(str(path).encode()).hexdigest()[:16]

    def copy(work: Path) -> Path:
        shutil.copytree(path, work / "tree", symlinks=True)
        return work / "tree"

    return _make_base(key, pin, f"tree {path}", "path", copy)


def add_source_argument(
    parser, help: str = "where the pristine release comes from (default: auto)"
) -> None:
    """The `--source auto|git|sdist|PATH` option every command that resolves a base takes."""
    parser.add_argument("--source", default="auto", metavar="auto|git|sdist|PATH", help=help)


def resolve_base(pin: Pin, source: str = "auto") -> Base:
    """The verified pristine base for `source`: auto, git, sdist or a path."""
    testseam.point("resolve")
    if source == "git":
        return base_from_git(pin)
    if source == "sdist":
        return base_from_sdist(pin)
    if source == "auto":
        label = f"sdist {pin.sdist_filename}"
        cached = _cached_base(f"sdist-{pin.sdist_sha256}", pin, "sdist", label)
        if git_reachable(pin.repository):
            logger.info("source: git (%s answered)", pin.repository)
            return base_from_git(pin)
        if cached:
            logger.info("source: sdist (cached; %s not reachable)", pin.repository)
            return cached
        logger.info("source: sdist from the package index (%s not reachable)", pin.repository)
        return base_from_sdist(pin)
    return base_from_path(Path(source), pin)
