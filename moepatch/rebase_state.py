"""The saved state of a rebase: one entry per patch, in the work tree's git directory.

``<work>/.git/moepatch/rebase.json`` is rewritten atomically after every
step, next to a byte copy of ``vllm.pin`` and ``patches/`` taken at the
start (what ``--abort`` restores).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import write_json_atomic
from .errors import ToolError

STATE_DIR = Path(".git") / "moepatch"
STATE_FILE = "rebase.json"
BACKUP_DIR = "rebase-backup"
WORK_MARKER = "rebase-work"

# outcomes a patch gets only in a rebase (the others: replay.py)
RESOLVED, DROPPED = "conflict-resolved", "dropped"


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


def backup(work: Path, pin_path: Path, patches_dir: Path) -> None:
    backup = Path(work) / STATE_DIR / BACKUP_DIR
    shutil.rmtree(backup, ignore_errors=True)
    (backup / "patches").mkdir(parents=True)
    shutil.copy2(pin_path, backup / "vllm.pin")
    for path in sorted(Path(patches_dir).iterdir()):
        if path.is_file():
            shutil.copy2(path, backup / "patches" / path.name)


def restore(work: Path, pin_path: Path, patches_dir: Path) -> None:
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
