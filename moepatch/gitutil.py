"""The one way this tool runs git: fixed settings, logged, errors typed.

User and system settings that change what git writes (diff prefixes, rename
detection, signatures, hooks, CRLF conversion, background gc) are pinned here,
so builds and exports are the same on every machine.
"""

import os
from pathlib import Path

import git

from . import logger
from .errors import GitError

# The identity that commits patches, and the one that records a pristine tree
# made from an sdist or a plain directory. Fixed so commit SHAs repeat.
COMMITTER = ("vllm-moe-patches", "vllm-moe-patches@users.noreply.github.com")
BASE_AUTHOR = ("vLLM release", "base@vllm-moe-patches.invalid")
BASE_DATE = "2000-01-01T00:00:00+0000"

_SETTINGS = {
    "core.autocrlf": "false",
    "core.safecrlf": "false",
    "core.hooksPath": os.devnull,
    "core.quotePath": "true",
    "commit.gpgsign": "false",
    "tag.gpgsign": "false",
    "diff.renames": "true",
    "diff.noprefix": "false",
    "diff.mnemonicPrefix": "false",
    "diff.algorithm": "myers",
    "diff.context": "3",
    "diff.interHunkContext": "0",
    "format.signature": "",
    "format.coverLetter": "false",
    "format.numbered": "false",
    "gc.auto": "0",
    "color.ui": "false",
    "advice.detachedHead": "false",
    "init.defaultBranch": "main",
}


def _options() -> list[str]:
    opts = []
    for key, value in _SETTINGS.items():
        opts += ["-c", f"{key}={value}"]
    return opts


def env_for(ident: tuple[str, str], date: str | None = None) -> dict[str, str]:
    name, email = ident
    env = {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }
    if date:
        env["GIT_AUTHOR_DATE"] = date
        env["GIT_COMMITTER_DATE"] = date
    return env


def run(
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    strip: bool = True,
    raw: bool = False,
) -> tuple[int, str | bytes, str]:
    """Run `git <args>` in cwd; return (status, stdout, stderr).

    With check=True a non-zero status raises GitError: one line naming the
    command and the repository, git's own output kept for -v. With raw=True
    stdout is the undecoded bytes (file contents).
    """
    command = ["git", "--no-pager", *_options(), *args]
    logger.debug("git %s  (in %s)", " ".join(args), cwd)
    full_env = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(env or {})}
    status, out, err = git.Git(str(cwd)).execute(
        command,
        env=full_env,
        with_extended_output=True,
        with_exceptions=False,
        strip_newline_in_stdout=strip,
        stdout_as_string=not raw,
    )
    if check and status != 0:
        raise _one_line_error(cwd, args, status, err)
    return status, out, err


def _one_line_error(cwd: Path, args: tuple[str, ...], status: int, stderr: str) -> GitError:
    """git's last `fatal:`/`error:` line (else its last line) after the command and path."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith(("fatal:", "error:"))]
    reason = (reasons or lines or [f"exit status {status}"])[-1]
    more = " (-v shows git's output)" if len(lines) > 1 else ""
    return GitError(f"git {args[0]} failed in {cwd}: {reason}{more}", details=lines)


def out(cwd: Path, *args: str, **kwargs) -> str:
    return run(cwd, *args, **kwargs)[1]


def blob(cwd: Path, sha: str) -> bytes:
    """The exact bytes of one blob."""
    return run(cwd, "cat-file", "blob", sha, strip=False, raw=True)[1]


def rev(cwd: Path, name: str) -> str | None:
    status, sha, _ = run(cwd, "rev-parse", "--verify", "-q", f"{name}^{{commit}}", check=False)
    return sha if status == 0 else None


def is_repo(path: Path) -> bool:
    return (Path(path) / ".git").exists()


def dirty_paths(cwd: Path) -> list[str]:
    """Tracked changes and untracked, unignored files: what a rebuild would lose."""
    status = out(cwd, "status", "--porcelain=v1", "--untracked-files=all", strip=False)
    return [line[3:] for line in status.splitlines() if line.strip()]
