"""Resolving a vLLM release for ``rebase``, ``matrix`` and ``upstream``.

A VERSION is looked up in the index's sdist listing (hash verified, remembered
in the cache), a release COMMIT is matched to its tag in the pin's
repository, a PATH is a local sdist tarball, release tree or checkout. Each
gives the release's pin and its verified pristine base.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path

from . import gitutil, index
from .cache import cache_root
from .errors import NetworkError, ToolError, VerifyError
from .pin import Pin
from .source import Base, base_from_git, base_from_path, read_version_file, resolve_base

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)+(?:(?:rc|\.post|\.dev|a|b)\d+)?)$")
_COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}$")


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
