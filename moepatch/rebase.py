"""``apply.py rebase --to VERSION|COMMIT|PATH``: move the series to another vLLM.

Design (b4-style scratch work, never in the user's tree):

- All work happens in a separate work repository, ``--work`` (default
  ``build/rebase``); the built tree (``build/vllm``), ``vllm.pin`` and
  ``patches/`` are not written until every patch has been decided. The
  state of a rebase lives in ``<work>/.git/moepatch/rebase.json``, next to a
  byte copy of ``vllm.pin`` and ``patches/`` taken at the start.
- The old side is built exactly as ``apply`` builds it (same base, same
  ``git am``), then kept as tag ``rebase/old-base`` and branch ``rebase/old``.
  The new release is resolved from the same kinds of sources as ``apply``
  (the index's sdist for a VERSION, the pin's repository for a release
  COMMIT, or a local tarball / tree / checkout PATH), verified, and tagged
  ``rebase/new-base``; the series is replayed onto it on ``rebase/new``,
  one ``git am --3way`` per patch, with the build's fixed committer and
  committer date = author date.
- Each patch ends as one of: ``clean`` (applies as is), ``3-way`` (needed the
  3-way merge), ``conflict-resolved`` (stopped, fixed by the user,
  ``--continue``), ``upstreamed`` (the change applies in reverse, or the
  3-way merge leaves nothing to commit: the new release already has it) or
  ``dropped`` (``--drop NAME``, or ``--skip`` at a conflict).
- A real conflict stops the run with the ``git am`` session left open in the
  work tree: fix the files, ``git add`` them, ``apply.py rebase --continue``;
  or ``--skip`` (drop that patch) or ``--abort``. Upstreamed patches never
  stop the replay, but the rebase does not finish until the user decides:
  ``--continue --drop NAME`` (or ``--skip`` to drop every upstreamed patch).
- Finishing moves ``vllm-base``/``patched`` of the work tree to the new
  series, re-exports ``patches/`` with :func:`moepatch.export.export`,
  writes the new ``vllm.pin`` and prints the per-patch report and
  ``git range-diff rebase/old-base..rebase/old rebase/new-base..rebase/new``.
- Interrupted (Ctrl-C, killed): state is saved after every patch; running
  the same command again (or ``--continue``) resumes where it stopped, an
  interrupted ``git am`` is rolled back and that patch replayed. ``--abort``
  restores ``vllm.pin`` and ``patches/`` byte for byte from the copy and
  removes the work tree; the built tree was never touched.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import export, gitutil, index, logger
from .build import (
    BASE_TAG,
    BRANCH,
    am_3way,
    build,
    describe_conflict,
    with_filename_trailer,
    write_json_atomic,
)
from .cache import cache_root
from .errors import ConflictError, NetworkError, TargetError, ToolError, VerifyError
from .pin import Pin, load_pin, write_pin
from .series import Patch, read_series
from .source import (
    Base,
    add_source_argument,
    base_from_git,
    base_from_path,
    read_version_file,
    resolve_base,
)

DEFAULT_WORK = Path("build/rebase")
OLD_BASE, OLD_BRANCH = "rebase/old-base", "rebase/old"
NEW_BASE, NEW_BRANCH = "rebase/new-base", "rebase/new"
STATE_DIR = Path(".git") / "moepatch"
STATE_FILE = "rebase.json"
BACKUP_DIR = "rebase-backup"
WORK_MARKER = "rebase-work"

CLEAN, THREE_WAY, CONFLICT = "clean", "3-way", "conflict"
RESOLVED, UPSTREAMED, DROPPED = "conflict-resolved", "upstreamed", "dropped"

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)+(?:(?:rc|\.post|\.dev|a|b)\d+)?)$")
_COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}$")


class RebaseStopped(ConflictError):
    """The rebase stopped and waits for the user (conflict or a decision)."""


# --------------------------------------------------------------------------
# resolving a release: VERSION, COMMIT or PATH -> (Pin, Base)
# --------------------------------------------------------------------------


def _release_record(version: str) -> Path:
    return cache_root() / "releases" / f"vllm-{version}.json"


def version_of_tarball(archive: Path) -> tuple[str, str | None]:
    """(version, commit id) recorded in an sdist's vllm/_version.py."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            member = next(
                (
                    m
                    for m in tar.getmembers()
                    if re.fullmatch(r"[^/]+/vllm/_version\.py", m.name) and m.isfile()
                ),
                None,
            )
            if member is None:
                raise VerifyError(f"{archive}: no vllm/_version.py; not a vLLM sdist")
            text = tar.extractfile(member).read().decode("utf-8")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise VerifyError(f"{archive}: cannot read: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vllm").mkdir()
        (Path(tmp) / "vllm" / "_version.py").write_text(text, encoding="utf-8")
        return read_version_file(Path(tmp))


def _commit_of(recorded: str | None, where: str) -> str:
    commit = (recorded or "").removeprefix("g").lower()
    if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        raise VerifyError(f"{where}: records no upstream commit id ({recorded!r})")
    return commit


def pin_for_version(version: str, like: Pin) -> Pin:
    """The pin of a vLLM release from the index's sdist listing, hash verified.

    The sdist's sha256 is the one the index lists; the file is downloaded (or
    taken from the cache, keyed by that hash) and checked against it, and its
    vllm/_version.py gives the version and commit. The result is remembered
    in the cache so a later run needs no index listing.
    """
    version = _VERSION.match(version).group(1)
    if version == like.version:
        return like
    filename = f"vllm-{version}.tar.gz"
    record = _release_record(version)
    if record.is_file():
        # resolved (and verified against the index listing) before: no network;
        # the sdist itself is checked against this hash again when it is used
        return Pin(**json.loads(record.read_text()))
    found = index.find_file("vllm", filename)
    if not found.sha256:
        raise VerifyError(f"{filename}: the index lists no sha256 for it")
    archive = index.fetch(found, found.sha256)  # verifies the download
    got, recorded = version_of_tarball(archive)
    if got != version:
        raise VerifyError(f"{filename}: vllm/_version.py says {got}, expected {version}")
    pin = Pin(
        version=version,
        tag=f"v{version}",
        commit=_commit_of(recorded, filename),
        repository=like.repository,
        sdist_filename=filename,
        sdist_sha256=found.sha256.lower(),
    )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(pin), indent=2) + "\n")
    return pin


def _tag_of_commit(pin: Pin, commit: str) -> str:
    status, out, err = gitutil.run(Path.cwd(), "ls-remote", "--tags", pin.repository, check=False)
    if status != 0:
        raise NetworkError(f"git ls-remote {pin.repository} failed: {err.strip()}")
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if sha.lower().startswith(commit.lower()) and ref.startswith("refs/tags/v"):
            return ref.removeprefix("refs/tags/").removesuffix("^{}")
    raise ToolError(
        f"{commit} is not a release commit of {pin.repository}; vllm.pin records "
        "releases: give a VERSION, or a PATH to a release tree or sdist"
    )


def resolve_release(spec: str, like: Pin, source: str = "auto") -> tuple[Pin, Base]:
    """The verified pin and pristine base for VERSION, release COMMIT or PATH.

    ``source`` (auto, git or sdist) picks where a VERSION's tree comes from;
    the pin always records the release's sdist and its index-listed hash.
    """
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if not path.name.endswith((".tar.gz", ".tgz")):
                raise ToolError(f"{path}: not a .tar.gz sdist")
            version, recorded = version_of_tarball(path)
            pin = Pin(
                version,
                f"v{version}",
                _commit_of(recorded, str(path)),
                like.repository,
                path.name,
                index.sha256_file(path),
            )
            return pin, base_from_path(path, pin)
        if (path / "vllm" / "_version.py").is_file():
            version, recorded = read_version_file(path)
        elif gitutil.is_repo(path):
            text = gitutil.out(path, "show", "HEAD:vllm/_version.py", check=False)
            m = re.search(r"^__version__ = version = '([^']+)'", text, re.MULTILINE)
            if not m:
                raise VerifyError(f"{path}: HEAD records no vllm/_version.py version")
            version, recorded = m.group(1), gitutil.rev(path, "HEAD")
        else:
            raise VerifyError(f"{path}: no vllm/_version.py; not a vLLM release tree")
        indexed = pin_for_version(version, like)
        commit = _commit_of(recorded, str(path)) if recorded else indexed.commit
        pin = Pin(
            version,
            f"v{version}",
            commit,
            like.repository,
            indexed.sdist_filename,
            indexed.sdist_sha256,
        )
        return pin, base_from_path(path, pin)
    if _VERSION.match(spec):
        pin = pin_for_version(spec, like)
        # a PATH --source names the old release's tree, not this one's
        kind = source if source in ("auto", "git", "sdist") else "sdist"
        return pin, resolve_base(pin, kind)
    if _COMMIT.match(spec):
        tag = _tag_of_commit(like, spec)
        pin = pin_for_version(tag, like)
        pin = Pin(
            pin.version, tag, spec.lower(), like.repository, pin.sdist_filename, pin.sdist_sha256
        )
        return pin, base_from_git(pin)
    raise ToolError(f"--to {spec}: not a version, a commit, or an existing path")


# --------------------------------------------------------------------------
# applying one patch and classifying the result (shared with matrix/upstream)
# --------------------------------------------------------------------------


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


def scratch_repo(base: Base, where: Path) -> Path:
    """A throwaway repository at `where` with the base checked out."""
    where.mkdir(parents=True, exist_ok=True)
    gitutil.run(where, "init", "-q")
    gitutil.run(where, "fetch", "-q", "--no-tags", str(base.repo), base.commit)
    gitutil.run(where, "tag", "-f", BASE_TAG, base.commit)
    gitutil.run(where, "checkout", "-q", "-f", base.commit)
    return where


# --------------------------------------------------------------------------
# rebase state
# --------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    old_commit: str
    status: str | None = None  # None until replayed
    new_commit: str | None = None
    details: list[str] = field(default_factory=list)
    dropped: bool = False


@dataclass
class RebaseState:
    to: str
    source: str
    pin_path: str
    patches_dir: str
    old_pin: dict
    new_pin: dict
    old_base: str
    new_base: str
    new_base_source: str
    entries: list[Entry]
    phase: str = "replay"  # replay, conflict, decide, finalizing, done
    current: str | None = None

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ToolError(f"--drop {name}: not a patch of the series being rebased")


def _state_path(work: Path) -> Path:
    return Path(work) / STATE_DIR / STATE_FILE


def load_state(work: Path) -> RebaseState | None:
    try:
        data = json.loads(_state_path(work).read_text())
    except (FileNotFoundError, ValueError):
        return None
    data["entries"] = [Entry(**e) for e in data["entries"]]
    return RebaseState(**data)


def save_state(work: Path, state: RebaseState) -> None:
    write_json_atomic(_state_path(work), asdict(state))


def _backup(work: Path, pin_path: Path, patches_dir: Path) -> None:
    backup = Path(work) / STATE_DIR / BACKUP_DIR
    shutil.rmtree(backup, ignore_errors=True)
    (backup / "patches").mkdir(parents=True)
    shutil.copy2(pin_path, backup / "vllm.pin")
    for path in sorted(Path(patches_dir).iterdir()):
        if path.is_file():
            shutil.copy2(path, backup / "patches" / path.name)


def _restore(work: Path, pin_path: Path, patches_dir: Path) -> None:
    backup = Path(work) / STATE_DIR / BACKUP_DIR
    if not (backup / "vllm.pin").is_file():
        return
    pin_path.write_bytes((backup / "vllm.pin").read_bytes())
    saved = {p.name: p.read_bytes() for p in (backup / "patches").iterdir()}
    for path in Path(patches_dir).iterdir():
        if path.is_file() and path.name not in saved:
            path.unlink()
    for name, data in saved.items():
        target = Path(patches_dir) / name
        if not target.is_file() or target.read_bytes() != data:
            target.write_bytes(data)


# --------------------------------------------------------------------------
# the rebase
# --------------------------------------------------------------------------


def _prepare_work(work: Path) -> None:
    if work.exists() and any(work.iterdir()):
        if not (work / STATE_DIR / WORK_MARKER).is_file():
            raise TargetError(
                f"{work}: exists and is not a rebase work tree of apply.py; "
                "remove it or pick another --work"
            )
        shutil.rmtree(work)  # a finished rebase's leftovers


def start(
    to: str,
    pin_path: Path,
    patches_dir: Path,
    work: Path,
    source: str = "auto",
    drop: list[str] | None = None,
) -> RebaseState:
    """Begin a rebase of the series onto `to`; replays as far as it can."""
    pin_path, patches_dir, work = Path(pin_path), Path(patches_dir), Path(work)
    _prepare_work(work)
    old_pin = load_pin(pin_path)
    pin_text = pin_path.read_bytes()
    patches = read_series(patches_dir)
    names = [p.name for p in patches]
    for name in drop or []:
        if name not in names:
            raise ToolError(f"--drop {name}: not in {patches_dir / 'series'}")
    try:
        state = _start(to, pin_path, patches_dir, work, source, old_pin, pin_text, patches)
    except BaseException:
        # nothing outside the work tree was written yet: leave no trace
        shutil.rmtree(work, ignore_errors=True)
        raise
    for name in drop or []:
        entry = state.entry(name)
        entry.status, entry.dropped = DROPPED, True
    save_state(work, state)
    return _replay(work, state)


def _start(to, pin_path, patches_dir, work, source, old_pin, pin_text, patches):
    try:
        result = build(old_pin, pin_text, patches, work, source=source)
    except ConflictError as e:
        raise ConflictError(
            f"the current series does not apply to its own pin ({old_pin.version}): {e}",
            "fix the series first (`python apply.py check`)",
        ) from None
    (work / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (work / STATE_DIR / WORK_MARKER).write_text("apply.py rebase\n")
    _backup(work, pin_path, patches_dir)
    gitutil.run(work, "tag", "-f", OLD_BASE, result.state.base)
    gitutil.run(work, "branch", "-q", "-f", OLD_BRANCH, result.state.head)
    new_pin, new_base = resolve_release(to, old_pin, source)
    logger.info("new base: vLLM %s from %s", new_pin.version, new_base.description)
    if gitutil.rev(work, new_base.commit) != new_base.commit:
        gitutil.run(work, "fetch", "-q", "--no-tags", str(new_base.repo), new_base.commit)
    gitutil.run(work, "tag", "-f", NEW_BASE, new_base.commit)
    gitutil.run(work, "checkout", "-q", "-f", "-B", NEW_BRANCH, new_base.commit)
    state = RebaseState(
        to=to,
        source=source,
        pin_path=str(pin_path.resolve()),
        patches_dir=str(patches_dir.resolve()),
        old_pin=asdict(old_pin),
        new_pin=asdict(new_pin),
        old_base=result.state.base,
        new_base=new_base.commit,
        new_base_source=new_base.description,
        entries=[Entry(a["name"], a["commit"]) for a in result.state.applied],
    )
    save_state(work, state)
    return state


def _last_good(state: RebaseState) -> str:
    good = [e.new_commit for e in state.entries if e.new_commit]
    return good[-1] if good else state.new_base


def _reset_to_last_good(work: Path, state: RebaseState) -> None:
    if am_in_progress(work):
        gitutil.run(work, "am", "--abort", check=False)
    gitutil.run(work, "checkout", "-q", "-f", "-B", NEW_BRANCH, _last_good(state))


def _mbox_of_commit(work: Path, commit: str, name: str) -> Path:
    directory = work / STATE_DIR / "mbox"
    directory.mkdir(parents=True, exist_ok=True)
    text = gitutil.out(work, *export.FORMAT_PATCH, "--stdout", "-1", commit, strip=False)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _replay(work: Path, state: RebaseState) -> RebaseState:
    for entry in state.entries:
        if entry.status is not None:
            continue
        mbox = _mbox_of_commit(work, entry.old_commit, entry.name)
        outcome = apply_mbox(work, mbox, keep_conflict=True)
        if outcome.status == CONFLICT:
            entry.details = outcome.details
            state.phase, state.current = "conflict", entry.name
            save_state(work, state)
            raise _conflict_stop(work, state, entry)
        entry.status, entry.details = outcome.status, outcome.details
        if outcome.status != UPSTREAMED:
            entry.new_commit = gitutil.rev(work, "HEAD")
        logger.info("%-10s %s", outcome.status, entry.name)
        save_state(work, state)
    undecided = [e for e in state.entries if e.status == UPSTREAMED and not e.dropped]
    if undecided:
        state.phase, state.current = "decide", None
        save_state(work, state)
        names = " ".join(f"--drop {e.name}" for e in undecided)
        raise RebaseStopped(
            f"vLLM {state.new_pin['version']} already contains "
            f"{', '.join(e.name for e in undecided)} (upstreamed)",
            f"drop them with `python apply.py rebase --continue {names}` "
            "(or `--skip` to drop every upstreamed patch), or `--abort`",
            [f"{e.name}: {'; '.join(e.details)}" for e in undecided],
        )
    return finalize(work, state)


def _conflict_stop(work: Path, state: RebaseState, entry: Entry) -> RebaseStopped:
    hint = (
        f"resolve the conflicts in {work} (the `git am` session is open there; "
        f"`git -C {work} am --show-current-patch=diff` shows the patch), "
        f"`git -C {work} add <files>`, then `python apply.py rebase --continue`; "
        "or `python apply.py rebase --skip` to drop this patch, or "
        "`python apply.py rebase --abort` to put everything back"
    )
    return RebaseStopped(
        f"patch {entry.name} conflicts with vLLM {state.new_pin['version']}: "
        f"{'; '.join(entry.details) or 'see git am output'}",
        hint,
        entry.details,
    )


def _author_date(work: Path) -> str | None:
    script = work / ".git" / "rebase-apply" / "author-script"
    try:
        for token in shlex.split(script.read_text()):
            key, _, value = token.partition("=")
            if key == "GIT_AUTHOR_DATE":
                return value
    except OSError:
        pass
    return None


def _continue_conflict(work: Path, state: RebaseState) -> None:
    entry = state.entry(state.current)
    before = _last_good(state)
    if am_in_progress(work):
        unmerged = gitutil.out(work, "diff", "--name-only", "--diff-filter=U")
        if unmerged:
            raise RebaseStopped(
                f"patch {entry.name}: still unmerged: {', '.join(unmerged.split())}",
                f"fix them in {work}, `git add` them, and run --continue again",
            )
        env = gitutil.env_for(gitutil.COMMITTER)
        date = _author_date(work)
        if date:
            env["GIT_COMMITTER_DATE"] = date  # what --committer-date-is-author-date does
        status, out, err = gitutil.run(work, "am", "--continue", env=env, check=False)
        if status != 0:
            raise RebaseStopped(
                f"patch {entry.name}: git am --continue failed: "
                f"{(err or out).strip().splitlines()[0] if (err or out).strip() else ''}",
                "stage the resolved files (`git add`), or use --skip to drop the "
                "patch if nothing of it is left",
            )
    head = gitutil.rev(work, "HEAD")
    if head == before or gitutil.rev(work, f"{head}~1") != before:
        raise RebaseStopped(
            f"patch {entry.name}: expected one new commit on {before[:12]} in {work}",
            "resolve and `git add`, then --continue; or --skip / --abort",
        )
    gitutil.run(work, "checkout", "-q", "-B", NEW_BRANCH, head)
    entry.status, entry.new_commit = RESOLVED, head
    state.phase, state.current = "replay", None
    save_state(work, state)


def resume(
    work: Path,
    to: str | None = None,
    skip: bool = False,
    drop: list[str] | None = None,
) -> RebaseState:
    """Continue a stopped or interrupted rebase (after a fix, --skip or --drop)."""
    work = Path(work)
    state = load_state(work)
    if state is None:
        raise ToolError(f"no rebase in progress in {work}; start one with --to")
    if to and to != state.to:
        raise ToolError(
            f"a rebase to {state.to} is in progress in {work}",
            "finish it with --continue / --skip, or --abort it first",
        )
    for name in drop or []:
        entry = state.entry(name)
        if entry.status in (CLEAN, THREE_WAY, RESOLVED):
            raise ToolError(f"--drop {name}: already rebased; --abort and start again")
        entry.dropped = True
        if entry.status is None:
            entry.status = DROPPED
    if state.phase == "conflict":
        entry = state.entry(state.current)
        if skip or entry.dropped:
            _reset_to_last_good(work, state)
            entry.status, entry.dropped = DROPPED, True
            state.phase, state.current = "replay", None
            save_state(work, state)
        else:
            _continue_conflict(work, state)
    elif state.phase == "decide" and skip:
        for e in state.entries:
            if e.status == UPSTREAMED:
                e.dropped = True
    elif state.phase == "replay":
        # interrupted: roll back a half-done `git am` and replay from the last
        # recorded patch
        _reset_to_last_good(work, state)
    elif state.phase == "done":
        raise ToolError(f"the rebase in {work} is finished; nothing to continue")
    save_state(work, state)
    if state.phase == "finalizing":
        return finalize(work, state)
    state.phase = "replay"
    return _replay(work, state)


def finalize(work: Path, state: RebaseState) -> RebaseState:
    """Write the new pin and patches/ (idempotent, so an interrupted run redoes it)."""
    state.phase = "finalizing"
    save_state(work, state)
    gitutil.run(work, "checkout", "-q", "-f", "-B", NEW_BRANCH, _last_good(state))
    gitutil.run(work, "tag", "-f", BASE_TAG, state.new_base)
    gitutil.run(work, "branch", "-q", "-f", BRANCH, NEW_BRANCH)
    export.export(work, Path(state.patches_dir))
    write_pin(Pin(**state.new_pin), Path(state.pin_path))
    state.phase = "done"
    save_state(work, state)
    return state


def abort(work: Path) -> RebaseState:
    """Put vllm.pin and patches/ back as they were and remove the work tree."""
    work = Path(work)
    state = load_state(work)
    if state is None:
        raise ToolError(f"no rebase in progress in {work}")
    if state.phase == "done":
        raise ToolError(f"the rebase in {work} already finished; nothing to abort")
    if am_in_progress(work):
        gitutil.run(work, "am", "--abort", check=False)
    _restore(work, Path(state.pin_path), Path(state.patches_dir))
    shutil.rmtree(work)
    return state


def range_diff(work: Path) -> str:
    return gitutil.out(
        work,
        "range-diff",
        "--no-color",
        "--creation-factor=95",
        f"{OLD_BASE}..{OLD_BRANCH}",
        f"{NEW_BASE}..{NEW_BRANCH}",
        strip=False,
    )


def report_rows(state: RebaseState) -> list[dict]:
    rows = []
    for e in state.entries:
        word = e.status or "pending"
        if e.status == UPSTREAMED and e.dropped:
            word = "upstreamed, dropped"
        rows.append(
            {
                "name": e.name,
                "result": word,
                "old_commit": e.old_commit,
                "new_commit": e.new_commit,
                "details": e.details,
            }
        )
    return rows


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

REBASE_DOC = (
    "Move the series to another vLLM release (3-way replay, resumable).\n\n"
    + __doc__.split("\n\n", 1)[1].replace("``", "`")
)


def configure_rebase(parser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--to",
        metavar="VERSION|COMMIT|PATH",
        help="the vLLM release to move to: a version on the index "
        "(0.32.0), a release commit of the pin's repository, or "
        "a local sdist tarball / release tree / checkout",
    )
    what.add_argument(
        "--continue",
        dest="cont",
        action="store_true",
        help="go on after resolving a conflict (or an interruption)",
    )
    what.add_argument(
        "--skip",
        action="store_true",
        help="drop the conflicting patch (or every upstreamed one) and go on",
    )
    what.add_argument(
        "--abort",
        action="store_true",
        help="stop; restore vllm.pin and patches/, remove the work tree",
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="NAME",
        help="drop this patch from the series (repeatable)",
    )
    add_source_argument(
        parser,
        help="where the current pinned release comes from, as for "
        "apply; also how a --to VERSION is fetched "
        "(default: auto)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=DEFAULT_WORK,
        help="the rebase work tree (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def _print_report(state: RebaseState, work: Path, diff: str, as_json: bool) -> None:
    rows = report_rows(state)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "from": state.old_pin["version"],
                    "to": state.new_pin["version"],
                    "pin": state.new_pin,
                    "work": str(work),
                    "patches": rows,
                    "range_diff": diff,
                },
                indent=2,
            )
        )
        return
    old, new = state.old_pin["version"], state.new_pin["version"]
    print(f"rebased {len(rows)} patch(es) from vLLM {old} to {new} ({state.new_base_source})")
    width = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        commit = (r["new_commit"] or "")[:12] or "-"
        print(f"  {r['result']:<20} {r['name']:<{width}}  {commit}")
    print(
        f"wrote {state.pin_path} (vLLM {new}, sha256 "
        f"{state.new_pin['sdist_sha256'][:16]}...) and {state.patches_dir}/"
    )
    print(f"\nrange-diff {OLD_BASE}..{OLD_BRANCH} {NEW_BASE}..{NEW_BRANCH} (in {work}):")
    print(diff.rstrip("\n") or "  (no patches on either side)")
    print(
        f"\nthe rebased tree is {work} (branch '{BRANCH}'); "
        "run `python apply.py` to rebuild the build tree"
    )


def run_rebase(args) -> int:
    work = args.work.resolve()  # git runs inside it: paths given to git must be absolute
    if args.abort:
        state = abort(work)
        print(
            f"rebase to {state.to} aborted; {state.pin_path} and "
            f"{state.patches_dir}/ restored, {work} removed"
        )
        return 0
    in_progress = load_state(work)
    if in_progress and in_progress.phase != "done":
        state = resume(work, args.to, args.skip, args.drop)
    elif args.to:
        state = start(args.to, args.pin, args.patches, work, args.source, args.drop)
    else:
        raise ToolError(f"no rebase in progress in {work}; start one with --to VERSION")
    diff = range_diff(work)
    (work / STATE_DIR / "range-diff.txt").write_text(diff)
    _print_report(state, work, diff, args.json)
    return 0
