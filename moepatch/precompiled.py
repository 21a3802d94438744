"""Compiled vLLM ops for a built tree, taken from the same release's wheel.

The series touches only Python and Triton code, so the compiled extension
modules of the pinned release's own wheel are valid for the patched tree: this
is what vLLM's ``VLLM_USE_PRECOMPILED=1`` install does. The wheel is fetched
from pip's configured index through :mod:`moepatch.index` (verified by sha256
and cached), the chosen modules are unpacked once into the cache, and copied
into the built tree, where ``.git/info/exclude`` keeps them out of ``git
status``. Only the built tree is written: an installed vLLM is never touched.
Only ``--device cuda`` runs need this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import logger
from .errors import NetworkError, ToolError, VerifyError
from .index import sha256_file

#: The modules the fused-MoE kernel tests load (``torch.ops._C`` / ``_moe_C``).
DEFAULT_MODULES = (
    "vllm/_C_stable_libtorch.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",
)

#: Wheel hashes checked here, used when the index gives none (or to refuse a
#: different file listed under the same name).
KNOWN_WHEEL_SHA256 = {
    "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl": (
        "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa"
    ),
}

EXCLUDE_MARK = "# moepatch: precompiled modules from the release wheel"


class PrecompiledError(ToolError):
    """The release wheel or its compiled modules cannot be used."""

    exit_code = 21


@dataclass(frozen=True)
class Placed:
    """What :func:`place_modules` did."""

    wheel: Path
    modules: tuple[str, ...]
    copied: tuple[str, ...]  # modules written now (others were already in place)


def wheel_filename(version: str, platform: str = "manylinux_2_28_x86_64") -> str:
    """The x86_64 CUDA wheel of a vLLM release (stable-ABI, any CPython >= 3.8)."""
    return f"vllm-{version}-cp38-abi3-{platform}.whl"


def fetch_wheel(version: str, wheel: Path | None = None) -> Path:
    """Return a verified local copy of vLLM ``version``'s wheel.

    Args:
        version: the pinned vLLM version.
        wheel: a local wheel file to use instead of the index; it must have the
            release's file name and, where known, its sha256.

    Returns:
        The path of the wheel (in the download cache unless ``wheel`` was given).
        A cached copy is used without asking the index when its hash is known
        here, or when the index cannot be reached.
    """
    name = wheel_filename(version)
    known = KNOWN_WHEEL_SHA256.get(name)
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise PrecompiledError(f"{wheel}: no such wheel file")
        if wheel.name != name:
            raise PrecompiledError(f"{wheel}: expected the release wheel {name}")
        if known and sha256_file(wheel) != known:
            raise VerifyError(f"{wheel}: sha256 differs from the release's {known}")
        return wheel
    from . import index  # network code only when needed

    hit = index.cached_copy(name, known) if known else None
    if hit:
        return hit
    try:
        return index.fetch(index.find_file("vllm", name), expected_sha256=known)
    except NetworkError:
        # Offline: the copy verified against the index when it was downloaded.
        hit = index.cached_copy(name)
        if hit is None:
            raise
        logger.info("package index unreachable; using the cached %s", hit)
        return hit


def _modules_cache(wheel: Path) -> Path:
    from .cache import cache_root

    return cache_root() / "precompiled" / wheel_sha256(wheel)


def wheel_sha256(wheel: Path) -> str:
    """The sha256 of a wheel that :func:`fetch_wheel` returned."""
    # Cached downloads live in downloads/<sha256>/<name>, verified on the way
    # in and on every hit: reuse that key.
    parent = wheel.parent.name
    if len(parent) == 64 and all(c in "0123456789abcdef" for c in parent):
        return parent
    return sha256_file(wheel)


def extract_modules(wheel: Path, modules: tuple[str, ...] = DEFAULT_MODULES) -> Path:
    """Unpack ``modules`` from ``wheel`` into the cache once; return that folder."""
    dest = _modules_cache(wheel)
    missing = [m for m in modules if not (dest / m).is_file()]
    if not missing:
        return dest
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for m in missing:
                if m not in names:
                    raise PrecompiledError(f"{wheel.name} holds no {m}")
                target = dest / m
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
                with os.fdopen(fd, "wb") as out, zf.open(m) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
    except zipfile.BadZipFile as e:
        raise PrecompiledError(f"{wheel}: not a wheel ({e})") from None
    return dest


def _git_info_exclude(tree: Path) -> Path | None:
    """The tree's info/exclude (the common git dir's, so worktrees share it)."""
    dotgit = tree / ".git"
    if dotgit.is_dir():
        return dotgit / "info" / "exclude"
    if dotgit.is_file():  # a worktree: "gitdir: <repo>/.git/worktrees/<name>"
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = (tree / text.split(":", 1)[1].strip()).resolve()
            common = gitdir / "commondir"
            if common.is_file():
                gitdir = (gitdir / common.read_text().strip()).resolve()
            return gitdir / "info" / "exclude"
    return None


def exclude_in_git(tree: Path, paths: tuple[str, ...]) -> None:
    """List ``paths`` (tree-relative) in the tree's ``.git/info/exclude``."""
    exclude = _git_info_exclude(tree)
    if exclude is None:
        return
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text() if exclude.is_file() else ""
    lines = set(text.splitlines())
    wanted = [f"/{p}" for p in paths if f"/{p}" not in lines]
    if not wanted:
        return
    add = "" if not text or text.endswith("\n") else "\n"
    if EXCLUDE_MARK not in lines:
        add += EXCLUDE_MARK + "\n"
    exclude.write_text(text + add + "\n".join(wanted) + "\n")


def check_tree(tree: Path) -> Path:
    """Refuse anything but a vLLM source tree outside site-packages."""
    tree = Path(tree).resolve()
    if not (tree / "vllm" / "__init__.py").is_file():
        raise PrecompiledError(f"{tree} is not a vLLM source tree (no vllm/__init__.py)")
    if {"site-packages", "dist-packages"} & set(tree.parts):
        raise PrecompiledError(
            f"{tree} looks like an installed vLLM; modules go into a built tree only"
        )
    return tree


def place_modules(
    tree: Path,
    version: str,
    *,
    modules: tuple[str, ...] = DEFAULT_MODULES,
    wheel: Path | None = None,
    source_dir: Path | None = None,
) -> Placed:
    """Put the release's compiled modules into a built tree.

    Args:
        tree: the built vLLM tree (e.g. ``build/vllm`` or a worktree of it).
        version: the pinned vLLM version (selects the wheel).
        modules: tree-relative module paths to place.
        wheel: use this local wheel file instead of the index.
        source_dir: take the modules from this folder (laid out like the wheel,
            e.g. ``<dir>/vllm/_moe_C_stable_libtorch.abi3.so``) instead of a
            wheel; used on the device, where there is no network.

    Returns:
        What was placed.
    """
    tree = check_tree(tree)
    if source_dir is not None:
        src_root = Path(source_dir)
        wheel_path = src_root
    else:
        wheel_path = fetch_wheel(version, wheel)
        src_root = extract_modules(wheel_path, modules)
    copied = []
    for m in modules:
        src = src_root / m
        if not src.is_file():
            raise PrecompiledError(f"{src}: compiled module missing")
        dst = tree / m
        same_size = dst.is_file() and dst.stat().st_size == src.stat().st_size
        if same_size and sha256_file(dst) == sha256_file(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".part-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
        copied.append(m)
    exclude_in_git(tree, modules)
    return Placed(wheel_path, tuple(modules), tuple(copied))
