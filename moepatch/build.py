"""Build the patched tree: the pristine base plus one commit per patch.

What a built tree holds is listed in `layout`. A build that fails never moves
`patched`: a tree that was built before stays checked out as it was. A build
that is killed is taken back by the next run (see `ownership`). Re-running with
nothing changed is a no-op.
"""

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import gitutil, logger, ownership, testseam
from .errors import ConflictError, TargetError
from .export import names_by_subject, render
from .layout import BACKUP_REFS, BASE_TAG, BRANCH, FAILED_BRANCH, FILENAME_TRAILER, WIP_BRANCH
from .pin import Pin
from .series import Patch, message_of
from .source import Base, resolve_base


@dataclass
class State:
    fingerprint: str
    base: str
    source: str
    head: str | None
    applied: list[dict] = field(default_factory=list)  # {"name", "commit"}
    failed: str | None = None

    @property
    def complete(self) -> bool:
        return self.failed is None and self.head is not None

    def built_from(self, pin_text: bytes, patches: list[Patch]) -> bool:
        """Whether this build used exactly this pin and these patch files."""
        return self.fingerprint == fingerprint(pin_text, patches)


@dataclass
class BuildResult:
    target: Path
    state: State
    noop: bool
    seconds: float
    backups: list[str] = field(default_factory=list)


def state_path(target: Path) -> Path:
    return Path(target) / ".git" / "moepatch" / "state.json"


def read_state(target: Path) -> State | None:
    try:
        return State(**json.loads(state_path(target).read_text()))
    except (FileNotFoundError, TypeError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _write_state(target: Path, state: State) -> None:
    write_json_atomic(state_path(target), asdict(state))


def fingerprint(pin_text: bytes, patches: list[Patch]) -> str:
    digest = hashlib.sha256(pin_text)
    for p in patches:
        digest.update(b"\0" + p.name.encode() + b"\0" + p.data)
    return digest.hexdigest()


def with_filename_trailer(patch: Patch) -> bytes:
    """The patch text with a `Patch-Filename:` trailer added to its message.

    The trailer lets `export` write each commit back to the file it came from,
    whatever its subject becomes; export removes it again.
    """
    head, sep, mail_body = patch.text.partition("\n\n")
    message = message_of(mail_body)
    trimmed = message.rstrip("\n")
    new_message = trimmed + f"\n{FILENAME_TRAILER}: {patch.name}" + message[len(trimmed) :]
    return (head + sep + new_message + mail_body[len(message) :]).encode("utf-8")


def am_3way(repo: Path, mbox: Path) -> tuple[bool, str]:
    """`git am --3way` one patch at HEAD as the fixed committer; (applied, git's output)."""
    status, out, err = gitutil.run(
        repo,
        "am",
        "-q",
        "--keep",
        "--3way",
        "--committer-date-is-author-date",
        str(mbox),
        env=gitutil.env_for(gitutil.COMMITTER),
        check=False,
    )
    return status == 0, (out + "\n" + err).strip()


def _am(target: Path, patch: Patch, scratch: Path) -> tuple[bool, str]:
    mbox = scratch / patch.name
    mbox.write_bytes(with_filename_trailer(patch))
    return am_3way(target, mbox)


def describe_conflict(target: Path, output: str) -> list[str]:
    """Files and hunks that failed, from git's own report and the index."""
    details = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(("error: patch failed:", "CONFLICT", "error: ")):
            details.append(line.removeprefix("error: "))
    unmerged = gitutil.out(target, "diff", "--name-only", "--diff-filter=U")
    for path in unmerged.splitlines():
        if not any(path in d for d in details):
            details.append(f"conflict in {path}")
    return list(dict.fromkeys(details))


def _save_local_work(target: Path, state: State | None) -> list[str]:
    """Put uncommitted changes and foreign commits on backup refs; return them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved = []
    head = gitutil.rev(target, "HEAD")
    if head and state and head != state.head and head != state.base:
        ref = f"{BACKUP_REFS}/{stamp}-commits"
        gitutil.run(target, "update-ref", ref, head)
        saved.append(ref)
    if gitutil.dirty_paths(target):
        env = gitutil.env_for(gitutil.COMMITTER)
        gitutil.run(
            target,
            "stash",
            "push",
            "-q",
            "--include-untracked",
            "-m",
            "saved by apply.py --force",
            env=env,
        )
        ref = f"{BACKUP_REFS}/{stamp}-worktree"
        gitutil.run(target, "update-ref", ref, "refs/stash")
        gitutil.run(target, "stash", "drop", "-q")
        saved.append(ref)
    return saved


def _exported(target: Path, patches: list[Patch]) -> bool:
    """True when the commits on HEAD are exactly the series (e.g. after export)."""
    # Named as export names them: a commit re-applied by hand from a patch file
    # has no Patch-Filename trailer and keeps its file's name by its subject.
    rendered = render(target, f"{BASE_TAG}..HEAD", names_by_subject(patches))
    return rendered == [(p.name, p.data) for p in patches]


def _check_target(
    target: Path, state: State | None, patches: list[Patch], force: bool
) -> list[str]:
    """Refuse a target holding someone's work unless --force; with it, keep that work."""
    if not target.exists() or not any(target.iterdir()):
        return []
    if state is None:
        if not force:
            raise TargetError(
                f"{target}: exists and was not built by apply.py; "
                "remove it, pick another --target, or pass --force to move it aside"
            )
        aside = ownership.move_contents_aside(target)
        logger.warning("moved %s aside to %s", target, aside)
        return [str(aside)]
    problems = []
    dirty = gitutil.dirty_paths(target)
    if dirty:
        problems.append(f"{len(dirty)} changed file(s), e.g. {dirty[0]}")
    head = gitutil.rev(target, "HEAD")
    if (
        state.head
        and head not in (state.head, state.base)
        and not state.failed
        and not _exported(target, patches)
    ):
        problems.append(f"HEAD {head[:12]} is not the built series")
    if problems and not force:
        raise TargetError(
            f"{target}: has local work ({'; '.join(problems)}); commit it elsewhere, "
            "run `python apply.py export` to turn commits into patches, or pass --force "
            "(your work is kept under refs/moepatch/backup/)"
        )
    return _save_local_work(target, state) if problems else []


def _prepare_repo(target: Path, base: Base) -> None:
    # Also completes a `git init` that a kill cut short; harmless on a repository.
    gitutil.run(target, "init", "-q")
    if gitutil.rev(target, base.commit) != base.commit:
        gitutil.run(target, "fetch", "-q", "--no-tags", str(base.repo), base.commit)
    gitutil.run(target, "tag", "-f", BASE_TAG, base.commit)


def is_up_to_date(target: Path, print_: str) -> bool:
    state = read_state(target)
    return bool(
        state
        and state.complete
        and state.fingerprint == print_
        and gitutil.rev(target, "HEAD") == state.head
        and gitutil.rev(target, BRANCH) == state.head
        and not gitutil.dirty_paths(target)
    )


def build(
    pin: Pin,
    pin_text: bytes,
    patches: list[Patch],
    target: Path,
    source: str = "auto",
    force: bool = False,
) -> BuildResult:
    """Build (or confirm) the patched tree at `target`. Raises ConflictError."""
    start = time.monotonic()
    target = Path(target)
    print_ = fingerprint(pin_text, patches)
    with ownership.locked(target):
        resuming = ownership.interrupted(target)
        state = read_state(target) if gitutil.is_repo(target) else None
        if not resuming and is_up_to_date(target, print_):
            return BuildResult(target, state, True, time.monotonic() - start)
        if resuming:
            logger.warning("%s: taking back a build that was interrupted", target)
            backups = []
        else:
            backups = _check_target(target, state, patches, force)
        base = resolve_base(pin, source)
        logger.info("base: %s", base.description)
        ownership.begin(target)
        testseam.point("begin")
        if resuming:
            ownership.clear_leftovers(target)
        _prepare_repo(target, base)
        had_build = bool(state and state.complete and gitutil.rev(target, BRANCH))
        new_state = _apply_series(target, base, patches, print_, had_build, resuming)
        return BuildResult(target, new_state, False, time.monotonic() - start, backups)


def _apply_series(
    target: Path, base: Base, patches: list[Patch], print_: str, had_build: bool, resuming: bool
) -> State:
    gitutil.run(target, "checkout", "-q", "-f", "-B", WIP_BRANCH, base.commit)
    if resuming:
        # Files a killed `git am` or checkout wrote and never tracked. The user's
        # untracked files were refused or saved before the killed build began.
        gitutil.run(target, "clean", "-q", "-f", "-d")
    state = State(print_, base.commit, base.description, None)
    scratch = Path(tempfile.mkdtemp(prefix="moepatch-am-"))
    try:
        for patch in patches:
            ok, output = _am(target, patch, scratch)
            if not ok:
                details = describe_conflict(target, output)
                gitutil.run(target, "am", "--abort", check=False)
                return _fail(target, state, patch, details, had_build)
            commit = gitutil.rev(target, "HEAD")
            state.applied.append({"name": patch.name, "commit": commit})
            logger.info("applied %s", patch.name)
            testseam.point("am")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gitutil.run(target, "checkout", "-q", "-B", BRANCH, WIP_BRANCH)
    gitutil.run(target, "branch", "-q", "-D", WIP_BRANCH)
    gitutil.run(target, "branch", "-q", "-D", FAILED_BRANCH, check=False)
    state.head = gitutil.rev(target, "HEAD")
    testseam.point("record")
    _write_state(target, state)
    ownership.end(target)
    return state


def _fail(target: Path, state: State, patch: Patch, details: list[str], had_build: bool):
    gitutil.run(target, "branch", "-q", "-f", FAILED_BRANCH, WIP_BRANCH)
    if had_build:
        gitutil.run(target, "checkout", "-q", "-f", BRANCH)
        where = f"the previous build is still checked out on '{BRANCH}'"
    else:
        gitutil.run(target, "checkout", "-q", "-f", FAILED_BRANCH)
        where = f"the tree is at the last good patch on '{FAILED_BRANCH}'"
    gitutil.run(target, "branch", "-q", "-D", WIP_BRANCH)
    previous = read_state(target)
    if previous and had_build:
        previous.failed = patch.name
        _write_state(target, previous)
    else:
        state.failed = patch.name
        _write_state(target, state)
    ownership.end(target)
    hint = (
        f"{where}. To fix patches/{patch.name}: in {target}, `git checkout {FAILED_BRANCH}`, "
        f"`git am -3 -k {patch.path.resolve()}`, resolve, `git am --continue`, then "
        "`python apply.py export` and `python apply.py` again; or drop it from patches/series."
    )
    raise ConflictError(
        f"patch {patch.name} does not apply: {'; '.join(details) or 'see git am output'}",
        hint,
        details,
    )
