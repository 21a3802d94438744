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
here, so neither module depends on the other for them.
"""

BASE_TAG = "vllm-base"
BRANCH = "patched"
FAILED_BRANCH = "moepatch/failed"
WIP_BRANCH = "moepatch/wip"
BACKUP_REFS = "refs/moepatch/backup"
# Added to each commit's message by build, removed again by export.
FILENAME_TRAILER = "Patch-Filename"
