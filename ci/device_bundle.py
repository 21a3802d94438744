#!/usr/bin/env python3
"""Pack what the GPU device needs to run the test selection, within 64 MiB.

The device machine has torch, triton and pytest but no network, no vLLM and
no git repository of ours. This script packs, into ``.device/bundle/``:

* ``trees/base.tar.xz``: the built tree's pristine base (tag ``vllm-base``):
  ``vllm/``, ``tests/``, ``benchmarks/kernels/``, ``pyproject.toml``;
* ``trees/patched.tar.xz`` + ``trees/patched.deleted``: only the files the
  series changes (``vllm-base..HEAD`` of the built tree), laid over a copy of
  the base there, so base and patched travel for the price of one tree;
* ``so/vllm/*.so.xz``: the release wheel's compiled modules with every GPU
  image but sm_90 zeroed in their ``.nv_fatbin`` (offsets unchanged; xz then
  squeezes the zeroes away), and ``so/vllm-<version>.dist-info``;
* ``wheels/``: the py3.12 dependency wheels (``ci/device-requirements.txt``);
* ``selection.json``: the test selection, resolved here from ``patches/``;
* ``MANIFEST.json``: sizes, hashes and provenance.

``ci/device_test.sh`` unpacks and runs it on the device. Usage::

    python ci/device_bundle.py wheels      # (re)download .device/wheels
    python ci/device_bundle.py build [--tree build/vllm] [--wheel PATH]

Then, e.g.: device ``run`` with ``carry: [".device/bundle"]`` and command
``bash ci/device_test.sh --runs base,patched --name gpu -n 8``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".device" / "bundle"
DEFAULT_WHEELS = REPO / ".device" / "wheels"
REQUIREMENTS = REPO / "ci" / "device-requirements.txt"
LIMIT = 64 * 1024 * 1024
TREE_PATHS = ("vllm", "tests", "benchmarks/kernels", "pyproject.toml")
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
FORBIDDEN_WHEELS = ("torch", "triton", "nvidia")

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KIND_CUBIN = 2


# --------------------------------------------------------------------------
# .nv_fatbin trimming
# --------------------------------------------------------------------------


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of a section of a little-endian ELF64 image."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        base = shoff + i * shentsize
        name_off = struct.unpack_from("<I", data, base)[0]
        end = data.index(b"\0", str_off + name_off)
        if bytes(data[str_off + name_off : end]).decode() == name:
            off, size = struct.unpack_from("<QQ", data, base + 0x18)
            return off, size
    return None


def fatbin_entries(data: bytes | bytearray, start: int, size: int):
    """Yield (container index, entry offset, header size, payload size, kind, arch).

    A ``.nv_fatbin`` section is a run of containers (magic ``0xBA55ED50``,
    16-byte header with the payload size), each holding entries: a header
    (kind 1 = PTX, 2 = cubin; ``arch`` at byte 28, e.g. 90) and its payload.
    """
    p, end, index = start, start + size, 0
    while p + 16 <= end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, p)
        if magic != FATBIN_MAGIC:
            if not any(data[p : p + 8]):  # alignment padding between containers
                p += 8
                continue
            raise ValueError(f"bad fatbin magic {magic:#x} at {p:#x}")
        q, cend = p + hsize, p + hsize + fsize
        while q < cend:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, q)
            arch = struct.unpack_from("<I", data, q + 28)[0]
            yield index, q, ehsize, psize, kind, arch
            q += ehsize + psize
        if q != cend:
            raise ValueError(f"fatbin container at {p:#x} overruns its size")
        p, index = cend, index + 1


def strip_fatbin(data: bytearray, keep_arch: int = 90) -> dict:
    """Zero every GPU image a ``keep_arch`` GPU never loads; offsets unchanged.

    Per container, keep the cubins built for exactly ``keep_arch`` (sm_90 and
    sm_90a); a container without one keeps its newest PTX for an arch <=
    ``keep_arch`` (the driver JIT-compiles it). Everything else is zeroed:
    headers stay, so the layout and all offsets are as built.

    Returns:
        Counts and bytes kept/zeroed.
    """
    sec = elf_section(data, ".nv_fatbin")
    if sec is None:
        return {"containers": 0, "kept": 0, "zeroed": 0, "bytes_zeroed": 0}
    containers: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for idx, off, hsize, psize, kind, arch in fatbin_entries(data, *sec):
        containers.setdefault(idx, []).append((off, hsize, psize, kind, arch))
    stats = {"containers": len(containers), "kept": 0, "zeroed": 0, "bytes_zeroed": 0}
    stats["ptx_fallback"] = 0
    stats["no_image"] = 0
    for entries in containers.values():
        keep = {e[0] for e in entries if e[3] == KIND_CUBIN and e[4] == keep_arch}
        if not keep:
            ptx = [e for e in entries if e[3] == KIND_PTX and e[4] <= keep_arch]
            if ptx:
                keep = {max(ptx, key=lambda e: e[4])[0]}
                stats["ptx_fallback"] += 1
            else:
                stats["no_image"] += 1
        for off, hsize, psize, _kind, _arch in entries:
            if off in keep:
                stats["kept"] += 1
                continue
            data[off + hsize : off + hsize + psize] = bytes(psize)
            stats["zeroed"] += 1
            stats["bytes_zeroed"] += psize
    return stats


# --------------------------------------------------------------------------
# dependency wheels
# --------------------------------------------------------------------------


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_wheels(folder: Path, reqs: list[str]) -> list[Path]:
    """The folder holds exactly one wheel per requirement, and no forbidden one."""
    wheels = sorted(folder.glob("*.whl"))
    by_name: dict[str, list[Path]] = {}
    for w in wheels:
        by_name.setdefault(_norm(w.name.split("-")[0]), []).append(w)
    problems = []
    for name, ws in by_name.items():
        if len(ws) > 1:
            problems.append(f"two versions of {name}: {[w.name for w in ws]}")
        if name.startswith(FORBIDDEN_WHEELS):
            problems.append(f"{name} must never be carried")
    for r in reqs:
        name, _, version = r.partition("==")
        got = by_name.get(_norm(name))
        if not got:
            problems.append(f"missing wheel for {r}")
        elif version and f"-{version}-" not in got[0].name:
            problems.append(f"{got[0].name} is not {r}")
    if problems:
        raise SystemExit("wheels: " + "; ".join(problems))
    return wheels


def download_wheels(dest: Path = DEFAULT_WHEELS, reqs: list[str] | None = None) -> None:
    reqs = reqs or read_requirements()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["-d", str(dest), *reqs]
    subprocess.run(cmd, check=True)
    wanted = {_norm(r.partition("==")[0]) for r in reqs}
    for w in dest.glob("*.whl"):  # drop leftovers of older lists
        if _norm(w.name.split("-")[0]) not in wanted:
            w.unlink()
    wheels = check_wheels(dest, reqs)
    total = sum(w.stat().st_size for w in wheels)
    (dest / "READY").write_text(
        f"# {len(wheels)} py3.12 x86_64 wheels, {total:,} bytes "
        f"({total / 2**20:.1f} MiB); list: ci/device-requirements.txt\n"
        '# In the run call: carry [".device/wheels"], and begin the command with:\n'
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir"
        " --upgrade --target /tmp/site .device/wheels/*.whl"
        " && export PYTHONPATH=/tmp/site || exit 1;\n"
    )
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")


# --------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------


def _git(tree: Path, *args: str, text: bool = True):
    return subprocess.run(
        ["git", "-C", str(tree), *args], check=True, capture_output=True, text=text
    ).stdout


def tree_tar(tree: Path, rev: str, dest: Path, paths: list[str] | None = None) -> int:
    """``git archive`` of ``rev`` (``paths`` or the usual ones), xz-compressed."""
    spec = paths if paths is not None else list(TREE_PATHS)
    if not spec:
        with tarfile.open(dest, "w:xz"):
            pass
        return dest.stat().st_size
    raw = _git(tree, "archive", "--format=tar", rev, "--", *spec, text=False)
    # Extreme preset: the device call carries 64 MiB in all, tracked files included.
    dest.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    return dest.stat().st_size


def pack_trees(tree: Path, out: Path, base_rev: str, head_rev: str) -> dict:
    (out / "trees").mkdir(parents=True, exist_ok=True)
    info = {"base_rev": _git(tree, "rev-parse", base_rev).strip()}
    info["head_rev"] = _git(tree, "rev-parse", head_rev).strip()
    info["base_bytes"] = tree_tar(tree, base_rev, out / "trees" / "base.tar.xz")
    diff = _git(
        tree,
        "diff",
        "--no-renames",
        "--name-status",
        base_rev,
        head_rev,
        "--",
        *TREE_PATHS,
    )
    changed, deleted = [], []
    for line in diff.splitlines():
        status, path = line.split("\t", 1)
        (deleted if status.startswith("D") else changed).append(path)
    info["patched_bytes"] = tree_tar(tree, head_rev, out / "trees" / "patched.tar.xz", changed)
    (out / "trees" / "patched.deleted").write_text("".join(p + "\n" for p in deleted))
    info["patched_changed"] = changed
    info["patched_deleted"] = deleted
    return info


# --------------------------------------------------------------------------
# compiled modules
# --------------------------------------------------------------------------


def pack_modules(wheel: Path, out: Path, modules: tuple[str, ...], arch: int) -> dict:
    import zipfile

    so_dir = out / "so"
    info = {"wheel": wheel.name, "modules": {}}
    with zipfile.ZipFile(wheel) as zf:
        for m in modules:
            data = bytearray(zf.read(m))
            stats = strip_fatbin(data, arch)
            dest = so_dir / (m + ".xz")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(lzma.compress(bytes(data), preset=6))
            stats["sha256_stripped"] = hashlib.sha256(data).hexdigest()
            stats["bytes"] = len(data)
            stats["xz_bytes"] = dest.stat().st_size
            info["modules"][m] = stats
        dist = [n for n in zf.namelist() if ".dist-info/" in n and not n.endswith("RECORD")]
        for n in dist:
            dest = so_dir / n
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(n))
    return info


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from moepatch import precompiled
    from moepatch.testing.runner import tree_version
    from moepatch.testing.selection import build_spec

    tree = Path(args.tree).resolve()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    manifest: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["trees"] = pack_trees(tree, out, args.base_rev, args.head_rev)
    version = args.version or tree_version(tree)
    manifest["version"] = version
    wheel = precompiled.fetch_wheel(version, Path(args.wheel) if args.wheel else None)
    modules = tuple(precompiled.DEFAULT_MODULES) + tuple(args.module or ())
    manifest["so"] = pack_modules(wheel, out, modules, args.arch)
    reqs = read_requirements()
    wheels_src = Path(args.wheels)
    if not wheels_src.is_dir() or not list(wheels_src.glob("*.whl")):
        download_wheels(wheels_src, reqs)
    wheels = check_wheels(wheels_src, reqs)
    (out / "wheels").mkdir()
    for w in wheels:
        shutil.copyfile(w, out / "wheels" / w.name)
    manifest["wheels"] = [w.name for w in wheels]
    spec = build_spec(REPO / "patches", device="cuda")
    (out / "selection.json").write_text(json.dumps(spec, indent=1) + "\n")
    manifest["bundle_bytes"] = _size(out)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = _size(out)
    print(
        f"bundle {out}: {total / 2**20:.1f} MiB in {time.time() - t0:.0f} s "
        f"(base {manifest['trees']['base_bytes'] / 2**20:.1f} MiB, patched overlay "
        f"{len(manifest['trees']['patched_changed'])} files, "
        + ", ".join(
            f"{Path(m).name} {s['xz_bytes'] / 2**20:.1f} MiB"
            for m, s in manifest["so"]["modules"].items()
        )
        + f", {len(wheels)} wheels)"
    )
    carried = total + working_tree_bytes(REPO)
    print(f"a call carries {carried / 2**20:.1f} MiB: the bundle and the working tree")
    if carried > LIMIT:
        print(
            f"error: {carried / 2**20:.1f} MiB is over the 64 MiB a device call carries",
            file=sys.stderr,
        )
        return 1
    if carried > LIMIT - 2**20:
        print("warning: less than 1 MiB left under the 64 MiB per call", file=sys.stderr)
    return 0


def working_tree_bytes(repo: Path) -> int:
    """Bytes of what travels with every device call besides the carried
    paths: the tracked files and the untracked ones git does not ignore."""
    names = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    paths = [repo / n.decode() for n in names if n]
    return sum(p.stat().st_size for p in paths if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="download the dependency wheels")
    w.add_argument("--dest", default=str(DEFAULT_WHEELS))
    b = sub.add_parser("build", help="pack the bundle")
    b.add_argument("--tree", default=str(REPO / "build" / "vllm"), help="built tree")
    b.add_argument("--base-rev", default="vllm-base", help="base commit (vllm-base)")
    b.add_argument("--head-rev", default="HEAD", help="patched commit (HEAD)")
    b.add_argument("--wheel", help="local release wheel (default: fetch from index)")
    b.add_argument("--version", help="vLLM version (default: the tree's)")
    b.add_argument("--module", action="append", help="extra compiled module to carry")
    b.add_argument("--arch", type=int, default=90, help="GPU arch to keep (90)")
    b.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="wheel folder")
    b.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    if args.cmd == "wheels":
        download_wheels(Path(args.dest))
        return 0
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
