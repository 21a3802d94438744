"""Errors the tool reports to users: one line each, with a distinct exit code."""


class ToolError(Exception):
    """A failure the user can act on; printed as one line, never a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, details=None) -> None:
        # details: extra lines (e.g. git's own output) printed only with -v
        super().__init__(message)
        self.hint = hint
        self.details = list(details or [])


class PinError(ToolError):
    """vllm.pin is missing, malformed or incomplete."""

    exit_code = 3


class SeriesError(ToolError):
    """patches/series is missing, or a patch file is not listed in it."""

    exit_code = 4


class DuplicateEntryError(SeriesError):
    """patches/series lists a file twice."""

    exit_code = 13


class MissingPatchError(SeriesError):
    """patches/series lists a file that does not exist."""

    exit_code = 14


class NotAPatchError(SeriesError):
    """A listed file is not `git format-patch` text."""

    exit_code = 15


class VerifyError(ToolError):
    """Downloaded or local source does not match the pin (hash, version, commit)."""

    exit_code = 5


class NetworkError(ToolError):
    """The index or git remote could not be reached, or a download broke off."""

    exit_code = 6


class TruncatedError(NetworkError):
    """A download ended before the size the server announced."""

    exit_code = 12


class ConflictError(ToolError):
    """A patch did not apply."""

    exit_code = 7


class TargetError(ToolError):
    """The output directory holds local changes or foreign content."""

    exit_code = 8


class LockedError(ToolError):
    """Another run holds the lock on the output directory."""

    exit_code = 9


class DriftError(ToolError):
    """patches/ differs from what the built tree exports."""

    exit_code = 10


class ArchiveError(ToolError):
    """An archive holds unsafe members (absolute paths, '..', escaping links)."""

    exit_code = 11


class GitError(ToolError):
    """A git command failed; the message names it and the repository, -v shows git's output."""

    exit_code = 16


class CacheError(ToolError):
    """The cache directory could not be written, locked or published into."""

    exit_code = 17


class TestSetupError(ToolError):
    """The tests cannot be started: no tree, bad selection, unknown patch."""

    __test__ = False  # not a pytest class
    exit_code = 20
