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

import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from . import export, gitutil, logger
from .build import BASE_TAG, BRANCH, build
from .errors import ConflictError, TargetError, ToolError
from .pin import Pin, load_pin, write_pin
from .rebase_state import (
    DROPPED,
    RESOLVED,
    STATE_DIR,
    WORK_MARKER,
    Entry,
    RebaseState,
    backup,
    load_state,
    restore,
    save_state,
)
from .release import resolve_release
from .replay import CLEAN, CONFLICT, THREE_WAY, UPSTREAMED, am_in_progress, apply_mbox
from .series import read_series

OLD_BASE, OLD_BRANCH = "rebase/old-base", "rebase/old"
NEW_BASE, NEW_BRANCH = "rebase/new-base", "rebase/new"


class RebaseStopped(ConflictError):
    """The rebase stopped and waits for the user (conflict or a decision)."""


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
    backup(work, pin_path, patches_dir)
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
    restore(work, Path(state.pin_path), Path(state.patches_dir))
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
