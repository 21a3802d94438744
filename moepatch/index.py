"""Find and download release files from the Python package index that pip uses.

The index is never hard-coded: it is read from pip's own configuration (config
files and PIP_* environment variables, via ``pip config list``), falling back to
pip's built-in default. Listings use the JSON simple API (PEP 691) with the HTML
simple API (PEP 503) as fallback; ``file://`` indexes work too.
"""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from . import logger, testseam
from .cache import cache_dir, cache_lock, cache_root
from .errors import NetworkError, ToolError, TruncatedError, VerifyError

_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
)
TIMEOUT_S = 30


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None


def _pip_default_index() -> str:
    from pip._internal.models.index import PyPI  # pip's own default

    return PyPI.simple_url


def index_urls() -> list[str]:
    """pip's index-url followed by its extra-index-urls, as pip would use them."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    # `pip config list` prints the merged files as `section.option='value'`;
    # pip itself lets the environment override [download] override [global].
    rank = {"global": 1, "download": 2, ":env:": 3}
    values: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank or option not in ("index-url", "extra-index-url"):
            continue
        if rank[section] >= values.get(option, (0, ""))[0]:
            values[option] = (rank[section], " ".join(shlex.split(raw)))
    values = {option: value for option, (_, value) in values.items()}
    primary = values.get("index-url") or _pip_default_index()
    extras = values.get("extra-index-url", "").split()
    return [primary, *extras]


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


def _read(url: str) -> tuple[bytes, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if path.is_dir():
            path = path / "index.html"
        try:
            return path.read_bytes(), "text/html"
        except FileNotFoundError:
            raise urllib.error.HTTPError(url, 404, "not found", None, None) from None
    request = urllib.request.Request(url, headers={"Accept": _ACCEPT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read(), response.headers.get("Content-Type", "")


def _project_files(index: str, project: str) -> list[IndexFile]:
    name = re.sub(r"[-_.]+", "-", project).lower()
    url = index.rstrip("/") + f"/{name}/"
    body, content_type = _read(url)
    files = []
    if "json" in content_type:
        for entry in json.loads(body)["files"]:
            files.append(
                IndexFile(
                    entry["filename"],
                    urllib.parse.urljoin(url, entry["url"]),
                    entry.get("hashes", {}).get("sha256"),
                )
            )
        return files
    parser = _AnchorParser()
    parser.feed(body.decode("utf-8", "replace"))
    for text, href in parser.links:
        link, _, fragment = href.partition("#")
        sha = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
        filename = text or urllib.parse.unquote(link.rsplit("/", 1)[-1])
        files.append(IndexFile(filename, urllib.parse.urljoin(url, link), sha))
    return files


def list_files(project: str) -> list[IndexFile]:
    """Every file of a project on pip's configured indexes, in index order."""
    files, errors = [], []
    for index in index_urls():
        try:
            files += _project_files(index, project)
        except urllib.error.HTTPError as e:
            if e.code != 404:
                errors.append(f"{index}: HTTP {e.code}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{index}: {getattr(e, 'reason', e)}")
    if errors and not files:
        raise NetworkError(f"cannot list {project} on the index ({'; '.join(errors)})")
    return files


def find_file(project: str, filename: str) -> IndexFile:
    """Locate one release file of a project on pip's configured indexes."""
    for f in list_files(project):
        if f.filename == filename:
            return f
    raise ToolError(f"{filename} is not on any configured package index")


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not sys.stderr.isatty() or None,
        leave=False,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_copy(filename: str, sha256: str | None = None) -> Path | None:
    """A cached download of `filename` whose bytes still hash to its cache key.

    With `sha256`, only that copy; without, the one copy the cache holds (a
    download is keyed by the hash it was verified against), or None when there
    are none or several.
    """
    root = cache_root() / "downloads"
    if sha256:
        candidates = [root / sha256.lower() / filename]
    else:
        candidates = sorted(root.glob(f"*/{filename}"))
    found = [p for p in candidates if p.is_file() and sha256_file(p) == p.parent.name]
    return found[0] if len(found) == 1 else None


def fetch(f: IndexFile, expected_sha256: str | None = None) -> Path:
    """Download (or reuse from the cache) one file, verified by sha256.

    The cache is keyed by the hash, so a hit needs no network. A download runs
    under the entry's cache lock and is written beside its final name, renamed
    only once the size and hash are right: a broken or tampered download never
    enters the cache, and concurrent runs download it once.
    """
    sha = (expected_sha256 or f.sha256 or "").lower()
    if not sha:
        raise VerifyError(f"{f.filename}: the index gives no sha256 and none was pinned")
    if f.sha256 and f.sha256.lower() != sha:
        raise VerifyError(f"{f.filename}: the index lists sha256 {f.sha256}, the pin says {sha}")
    dest = cache_root() / "downloads" / sha / f.filename
    if dest.is_file() and sha256_file(dest) == sha:
        logger.debug("cache hit: %s", dest)
        return dest
    with cache_lock(f"download-{sha}"):
        if dest.is_file() and sha256_file(dest) == sha:  # another run just fetched it
            return dest
        for stale in cache_dir("downloads", sha).glob(f"{f.filename}.part-*"):
            stale.unlink()  # left by a killed run; only the lock holder writes here
        _download(f, sha, dest)
    return dest


def _download(f: IndexFile, sha: str, dest: Path) -> None:
    partial = dest.with_name(dest.name + f".part-{os.getpid()}")
    digest = hashlib.sha256()
    received = 0
    logger.info("downloading %s", f.url)
    try:
        request = urllib.request.Request(f.url)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            with open(partial, "wb") as out, _progress(total, f.filename) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    testseam.point("download")
        if total is not None and received != total:
            raise TruncatedError(f"{f.filename}: download truncated ({received} of {total} bytes)")
        if digest.hexdigest() != sha:
            raise VerifyError(
                f"{f.filename}: sha256 mismatch (got {digest.hexdigest()}, want {sha})"
            )
        partial.replace(dest)
    except (urllib.error.URLError, OSError) as e:
        raise NetworkError(f"{f.filename}: download failed: {getattr(e, 'reason', e)}") from None
    finally:
        partial.unlink(missing_ok=True)
