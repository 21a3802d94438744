"""vllm.pin: the one vLLM release the series applies to."""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import PinError

_HEX = re.compile(r"[0-9a-f]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    version: str
    tag: str
    commit: str  # 7..40 hex digits; a short one is a prefix of the upstream SHA
    repository: str
    sdist_filename: str
    sdist_sha256: str

    def matches_commit(self, sha: str) -> bool:
        """True when a full upstream SHA (or git-describe 'g<hex>') agrees with the pin."""
        sha = sha.removeprefix("g").lower()
        shorter = min(len(sha), len(self.commit))
        return shorter >= 7 and sha[:shorter] == self.commit[:shorter]


def _require(table: dict, key: str, path: Path, prefix: str = "") -> str:
    name = f"{prefix}{key}"
    if key not in table:
        raise PinError(f"{path}: missing key '{name}'")
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise PinError(f"{path}: key '{name}' must be a non-empty string")
    return value.strip()


def parse_pin(text: str, path: Path) -> Pin:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PinError(f"{path}: not valid TOML: {e}") from None
    sdist = data.get("sdist")
    if not isinstance(sdist, dict):
        raise PinError(f"{path}: missing table '[sdist]'")
    pin = Pin(
        version=_require(data, "version", path),
        tag=_require(data, "tag", path),
        commit=_require(data, "commit", path).lower(),
        repository=_require(data, "repository", path),
        sdist_filename=_require(sdist, "filename", path, "sdist."),
        sdist_sha256=_require(sdist, "sha256", path, "sdist.").lower(),
    )
    if not (7 <= len(pin.commit) <= 40 and _HEX.fullmatch(pin.commit)):
        raise PinError(f"{path}: key 'commit' must be 7 to 40 hex digits")
    if not _SHA256.fullmatch(pin.sdist_sha256):
        raise PinError(f"{path}: key 'sdist.sha256' must be 64 hex digits")
    if not pin.repository.startswith(("https://", "http://", "file://", "/")):
        raise PinError(f"{path}: key 'repository' must be a URL")
    if not pin.sdist_filename.endswith((".tar.gz", ".tgz")):
        raise PinError(f"{path}: key 'sdist.filename' must name a .tar.gz")
    return pin


def load_pin(path: Path) -> Pin:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PinError(f"{path}: pin file not found") from None
    except UnicodeDecodeError as e:
        raise PinError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_pin(text, Path(path))


def format_pin(pin: Pin) -> str:
    """The canonical text of a pin file (what `rebase` writes)."""
    return (
        "# The vLLM release this patch series applies to. `python apply.py` verifies\n"
        "# every source against it: the git commit, or the sdist's sha256 and the\n"
        "# version and commit recorded in its vllm/_version.py.\n"
        f'version = "{pin.version}"\n'
        f'tag = "{pin.tag}"\n'
        "# Upstream commit: the full SHA when known, else the prefix that the\n"
        "# release's vllm/_version.py records.\n"
        f'commit = "{pin.commit}"\n'
        f'repository = "{pin.repository}"\n'
        "\n"
        "[sdist]\n"
        f'filename = "{pin.sdist_filename}"\n'
        f'sha256 = "{pin.sdist_sha256}"\n'
    )


def write_pin(pin: Pin, path: Path) -> None:
    Path(path).write_text(format_pin(pin), encoding="utf-8")
