"""The names of what `apply.py` writes into a built tree.

Layout of a built tree (a normal git checkout):
  tag    vllm-base          the pristine release (reproducible SHA)
  branch patched            base + the whole series, one commit per patch
  branch moepatch/failed    only after a failed build: base + the patches
                            that applied, for inspection
  refs/moepatch/backup/*    local work saved by --force
  .git/moepatch/state.json  what was built, from which pin and series
  .git/moepatch/building    present only while a build runs (or after one
                            was killed): the tree is the tool's own

Build writes these names and export reads them back; both import them from
here, so neither module depends on the other for them. Where the built tree
and the other work trees lie by default (`build_dir`) is here too, for every
command line that takes them.
"""

from pathlib import Path

BASE_TAG = "vllm-base"
BRANCH = "patched"
FAILED_BRANCH = "moepatch/failed"
WIP_BRANCH = "moepatch/wip"
BACKUP_REFS = "refs/moepatch/backup"
# Added to each commit's message by build, removed again by export.
FILENAME_TRAILER = "Patch-Filename"


def build_dir(patches_dir: Path) -> Path:
    """Where the commands write by default: build/ beside patches/, in the
    checkout whose series they use, wherever they run from."""
    return Path(patches_dir).resolve().parent / "build"


# Options whose default lies in build/: option -> entry there.
_BUILD_PATHS = {"target": "vllm", "tree": "vllm", "work": "rebase"}


def default_build_paths(args) -> None:
    """Fill the parsed options of `_BUILD_PATHS` left unset (None)."""
    for option, entry in _BUILD_PATHS.items():
        if getattr(args, option, ...) is None:
            setattr(args, option, build_dir(args.patches) / entry)
