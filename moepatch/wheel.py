"""`apply.py wheel`: an installable patched vLLM, made from the release wheel.

The series changes only Python and Triton code and the release wheel already
holds every compiled op, so the patched vLLM is that wheel with the series'
files laid over it (WHEEL_DOC says how).
"""

from __future__ import annotations

import ast
import base64
import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from . import gitutil
from .build import BASE_TAG, BRANCH, read_state
from .errors import DriftError, ToolError
from .index import sha256_file
from .pin import Pin, load_pin
from .precompiled import PrecompiledError, fetch_wheel, wheel_sha256
from .series import Patch, read_series
from .zipwrite import ZipWriter

PACKAGE = "vllm"
LABEL = "moe"  # the local version label: <release>+moe.<digest>
DIGEST_DIGITS = 12
MARKER = f"{PACKAGE}/_moepatch.json"
VERSION_FILE = f"{PACKAGE}/_version.py"

#: What the release wheel cannot carry a change to: compiled sources, the build
#: and the dependencies (METADATA keeps the release's).
BUILD_INPUTS = (
    *("csrc/*", "cmake/*", "rust/*", "requirements/*", "*CMakeLists.txt", "*.cmake"),
    *("setup.py", "setup.cfg", "pyproject.toml", "rust-toolchain.toml", "tools/build_rust.py"),
    *(f"*.{ext}" for ext in ("c", "cc", "cpp", "cu", "cuh", "h", "hpp", "rs")),
)

WHEEL_DOC = """\
Write an installable patched vLLM wheel: the release wheel plus the series.

Takes the pinned release's wheel (from pip's configured index, sha256-checked
and cached like the sdist; offline, the cached copy) and lays over it the files
that `vllm-base..patched` of the built tree changes under vllm/ (as committed:
uncommitted edits in the tree are not taken): added, replaced, deleted.
Compiled ops and dependencies stay the release's: a series that changes
compiled sources or the build (csrc/, CMake, setup.py, pyproject.toml,
requirements/, *.cu/*.cpp/*.h, Rust) is refused. The result:

  OUT/vllm-<release>+moe.<digest>-<the release's tags>.whl

<digest> is the first 12 hex digits of the series digest (sha256 over
vllm.pin and every patch, as recorded by the build). The version with that
PEP 440 local label is in METADATA, the .dist-info directory name, the file
name and vllm/_version.py (so `vllm.__version__`). vllm/_moepatch.json
records the pin, the release wheel, the digest and the patches. RECORD lists
every file's sha256 and size. Unchanged members are copied compressed, as
they are; every member gets the same timestamp and a sorted place, and the
files written here are stored uncompressed: the same pin and series give the
same bytes on every machine.

Install it with `pip install OUT/vllm-...whl` (torch and the other
dependencies as the release requires them).

exit codes: 5 the release wheel fails its sha256, 6 index unreachable and
nothing cached, 10 the tree is not the build of vllm.pin and patches/ (run
`apply.py`, or `apply.py export` first), 20 no built tree, 21 the release
wheel cannot be used (not a wheel, no RECORD, a changed file it does not
ship), 22 the series changes compiled sources or the build.
"""


class NoTreeError(ToolError):
    """There is no complete build to take the patched files from."""

    exit_code = 20


class BuildInputError(ToolError):
    """The series changes what the release wheel's binaries or metadata came from."""

    exit_code = 22


@dataclass(frozen=True)
class Overlay:
    """What the series changes under the package, by wheel path."""

    files: dict[str, tuple[bytes, int]]  # added or modified: (content, mode)
    modified: frozenset[str]  # of those, the ones the release has
    deleted: frozenset[str]
    outside: tuple[str, ...]  # changed paths outside the package (tests, benchmarks)


def local_version(release: str, digest: str) -> str:
    """`<release>+moe.<digest prefix>`, PEP 440-normalized (as file names must be)."""
    try:
        return str(Version(f"{release}+{LABEL}.{digest[:DIGEST_DIGITS]}"))
    except InvalidVersion:
        raise ToolError(f"vLLM version {release!r} cannot take a local label") from None


def _checked_state(target: Path, pin_text: bytes, patches: list[Patch]):
    """The build state of `target`, refusing anything but the build of this pin and series."""
    state = read_state(target) if gitutil.is_repo(target) else None
    head = gitutil.rev(target, BRANCH) if state else None
    if not state or not head or not gitutil.rev(target, BASE_TAG):
        raise NoTreeError(f"{target}: no built tree (run `python apply.py` first)")
    if not state.built_from(pin_text, patches):
        raise DriftError(
            f"{target}: built from another vllm.pin or patches/ (run `python apply.py`)"
        )
    if head != state.head:
        raise DriftError(
            f"{target}: branch '{BRANCH}' has commits that are not in patches/ "
            "(run `python apply.py export`, then `python apply.py`)"
        )
    return state


def refuse_build_inputs(target: Path, applied: list[dict]) -> None:
    """Stop at the first patch that changes compiled sources, the build or dependencies."""
    for entry in applied:
        changed = gitutil.out(
            target,
            "diff-tree",
            "-r",
            "--no-commit-id",
            "--no-renames",
            "--name-only",
            entry["commit"],
        )
        for path in changed.splitlines():
            if any(fnmatch.fnmatch(path, pattern) for pattern in BUILD_INPUTS):
                raise BuildInputError(
                    f"patch {entry['name']} changes {path}: the release wheel's compiled "
                    "code and metadata would not match it; build vLLM from the tree instead"
                )


def read_overlay(target: Path, base: str, head: str) -> Overlay:
    """The files `base..head` adds, changes or deletes, from git's objects."""
    raw = gitutil.out(
        target, "diff", "--raw", "-z", "--no-renames", "--no-abbrev", base, head, strip=False
    )
    fields = raw.split("\0")
    files, modified, deleted, outside = {}, set(), set(), []
    for meta, path in zip(fields[0::2], fields[1::2], strict=False):
        _old_mode, new_mode, _old, new_sha, status = meta.lstrip(":").split()
        if not path.startswith(f"{PACKAGE}/"):
            outside.append(path)
        elif status == "D":
            deleted.add(path)
        elif new_mode in ("100644", "100755"):
            files[path] = (gitutil.blob(target, new_sha), int(new_mode, 8))
            if status != "A":
                modified.add(path)
        else:
            raise ToolError(f"{path}: the series makes it a link or submodule; a wheel cannot")
    return Overlay(files, frozenset(modified), frozenset(deleted), tuple(outside))


# --------------------------------------------------------------------------
# the wheel
# --------------------------------------------------------------------------


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _relabel_metadata(text: str, version: str) -> str:
    head, sep, body = text.partition("\n\n")
    new, count = re.subn(r"^Version: .*$", f"Version: {version}", head, count=1, flags=re.M)
    if not count:
        raise PrecompiledError("METADATA has no Version: field")
    return new + sep + body


def _relabel_version_file(text: str, version: str) -> str:
    """vLLM's generated _version.py with the labelled version (as setuptools-scm writes it)."""
    new, count = re.subn(
        r"^(__version__ = version = ).*$", rf"\g<1>{version!r}", text, count=1, flags=re.M
    )
    if not count:
        raise PrecompiledError(f"{VERSION_FILE}: no `__version__ = version = ...` line")
    local = Version(version).local

    def add_local(match: re.Match) -> str:
        return match.group(1) + repr((*ast.literal_eval(match.group(2)), local))

    return re.sub(r"^(__version_tuple__ = version_tuple = )(.*)$", add_local, new, flags=re.M)


def _release_parts(zf: zipfile.ZipFile) -> tuple[str, dict[str, tuple[str, str]]]:
    """(the .dist-info directory, RECORD as path -> (hash, size)) of the release wheel."""
    dirs = {n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".dist-info")}
    if len(dirs) != 1:
        raise PrecompiledError(f"expected one .dist-info directory, found {sorted(dirs)}")
    dist_info = dirs.pop()
    try:
        text = zf.read(f"{dist_info}/RECORD").decode("utf-8")
    except KeyError:
        raise PrecompiledError(f"{dist_info}/RECORD is missing") from None
    return dist_info, {row[0]: (row[1], row[2]) for row in csv.reader(io.StringIO(text)) if row}


def marker(pin: Pin, release: Path, version: str, state, patches: list[Patch]) -> bytes:
    """vllm/_moepatch.json: what this wheel is (no time, no host: bytes repeat)."""
    info = {
        "version": version,
        "series_digest": state.fingerprint,
        "pin": asdict(pin),
        "release_wheel": {"filename": release.name, "sha256": wheel_sha256(release)},
        "tree": {"base": state.base, "patched": state.head},
        "patches": [
            {"name": p.name, "subject": p.subject, "status": p.status, "upstream": p.upstream}
            for p in patches
        ],
    }
    return (json.dumps(info, indent=1) + "\n").encode()


def write_wheel(release: Path, overlay: Overlay, version: str, extra: dict, out: Path) -> Path:
    """Write the relabelled wheel into `out` (atomically); return its path.

    `extra`: wheel path -> bytes of files this tool adds (vllm/_moepatch.json).
    """
    name, _release_version, tags = release.name.split("-", 2)
    dest = out / f"{name}-{version}-{tags}"
    with open(release, "rb") as src:
        try:
            zf = zipfile.ZipFile(src)
        except zipfile.BadZipFile as e:
            raise PrecompiledError(f"{release}: not a wheel ({e})") from None
        old_info, record = _release_parts(zf)
        new_info = f"{name}-{version}.dist-info"
        renames = {
            old_info: new_info,
            old_info.replace(".dist-info", ".data"): new_info[:-9] + "data",
        }
        shipped = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        absent = sorted(overlay.modified - set(shipped))
        if absent:
            raise PrecompiledError(f"{absent[0]}: changed by the series, not shipped in the wheel")
        if VERSION_FILE not in shipped:
            raise PrecompiledError(f"{release.name}: no {VERSION_FILE}")
        new_files = {path: data for path, (data, _mode) in overlay.files.items()}
        version_py = new_files.get(VERSION_FILE) or zf.read(VERSION_FILE)
        new_files[VERSION_FILE] = _relabel_version_file(version_py.decode(), version).encode()
        metadata = zf.read(f"{old_info}/METADATA").decode("utf-8")
        new_files[f"{new_info}/METADATA"] = _relabel_metadata(metadata, version).encode()
        new_files.update(extra)
        modes = {path: mode for path, (_data, mode) in overlay.files.items()}
        members: dict[str, zipfile.ZipInfo | bytes] = {}
        for path, info in shipped.items():
            top, _, rest = path.partition("/")
            renamed = f"{renames[top]}/{rest}" if top in renames else path
            modes.setdefault(renamed, info.external_attr >> 16)
            if path in overlay.deleted or renamed.startswith(f"{new_info}/RECORD"):
                continue  # RECORD (and its signatures, void now) is written below
            if renamed not in new_files and path not in record:
                raise PrecompiledError(f"{release.name}: {path} is not listed in RECORD")
            members[renamed] = info
        members.update(new_files)
        out.mkdir(parents=True, exist_ok=True)
        part = out / f".{dest.name}.part-{os.getpid()}"
        try:
            with open(part, "wb") as f:
                _write_members(ZipWriter(f), src, members, modes, record, new_info)
            os.replace(part, dest)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
            raise PrecompiledError(f"{release.name}: {e}") from None
        finally:
            part.unlink(missing_ok=True)
    return dest


def _write_members(writer: ZipWriter, src, members: dict, modes: dict, record, dist_info) -> None:
    """Every member in sorted order, .dist-info last, and RECORD (hashes, sizes) at the end."""
    rows = []
    for path in sorted(members, key=lambda p: (p.startswith(dist_info + "/"), p)):
        member = members[path]
        if isinstance(member, bytes):
            writer.add(path, member, modes.get(path, 0o644))
            rows.append((path, record_hash(member), str(len(member))))
        else:
            writer.copy(src, member, path)
            rows.append((path, *record[member.filename]))
    rows.append((f"{dist_info}/RECORD", "", ""))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    writer.add(f"{dist_info}/RECORD", text.getvalue().encode(), 0o644)
    writer.close()


# --------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    path: Path
    version: str
    overlay: Overlay
    seconds: float


def build_wheel(
    pin_path: Path, patches_dir: Path, target: Path, out: Path, release: Path | None = None
) -> Built:
    """The patched wheel of the built tree `target`, written into `out`."""
    start = time.monotonic()
    pin, patches = load_pin(pin_path), read_series(patches_dir)
    pin_text = Path(pin_path).read_bytes()
    target = Path(target)
    if not target.is_dir():
        raise NoTreeError(f"{target}: no built tree (run `python apply.py` first)")
    # Read by commit SHA, not branch: a build running meanwhile cannot change them.
    state = _checked_state(target, pin_text, patches)
    refuse_build_inputs(target, state.applied)
    overlay = read_overlay(target, state.base, state.head)
    wheel = fetch_wheel(pin.version, release)
    version = local_version(pin.version, state.fingerprint)
    extra = {MARKER: marker(pin, wheel, version, state, patches)}
    path = write_wheel(wheel, overlay, version, extra, Path(out))
    return Built(path, version, overlay, time.monotonic() - start)


def configure_wheel(parser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("dist"), help="where the wheel goes (default: %(default)s)"
    )
    parser.add_argument(
        "--target", type=Path, help="the built tree (default: build/vllm beside patches/)"
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        metavar="PATH",
        help="the release wheel as a local file instead of the index (its name must be the "
        "release's; its sha256 is checked where known)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON result")


def run_wheel(args) -> int:
    built = build_wheel(args.pin, args.patches, args.target, args.out, args.wheel)
    overlay = built.overlay
    replaced = len(overlay.modified)
    added = len(overlay.files) - replaced
    if args.json:
        info = {
            "ok": True,
            "wheel": str(built.path),
            "version": built.version,
            "sha256": sha256_file(built.path),
            "replaced": replaced,
            "added": added,
            "deleted": len(overlay.deleted),
            "outside": list(overlay.outside),
            "seconds": round(built.seconds, 3),
        }
        print(json.dumps(info, indent=2))
        return 0
    size = built.path.stat().st_size
    print(f"{built.path} ({size / 1e6:.1f} MB), vLLM {built.version}")
    print(
        f"  {PACKAGE}/: {replaced} file(s) replaced, {added} added, {len(overlay.deleted)} "
        f"deleted; {len(overlay.outside)} changed file(s) outside it are not part of the wheel"
    )
    print(f"built in {built.seconds:.1f} s; install: pip install {built.path}")
    return 0
