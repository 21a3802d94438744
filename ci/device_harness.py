"""The GPU device's side of a ``ci/device_bundle.py`` bundle, for the benchmarks.

The device has no network and no vLLM: a bundle carries the pristine base
tree, the patched files, the release wheel's compiled modules (sm_90 images
only) and the dependency wheels. ``unpack_bundle`` makes ``<work>/base`` and
``<work>/patched`` from it and installs the wheels into ``<work>/site``
(``unpack_trees`` and ``install_wheels`` do each half; ``find_trees`` takes
a bundle or two ready trees, as the benchmarks' options do); ``tree_digest``
identifies a tree's Python and Triton sources; ``versions`` records the
software and the GPU a result came from; ``nccl_library`` and
``skip_missing_nccl_suspend`` let vLLM's own NCCL communicator load on the
GPU machine's older NCCL. Used by ``ci/bench_layers.py``, ``ci/bench_gate.py``,
``ci/bench_e2e.py`` and ``ci/device_race.sh``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def tree_digest(tree: Path) -> dict:
    """sha256 over (path, sha256) of every file under the tree's ``vllm/``
    except compiled modules and caches (the Python and Triton sources)."""
    root = tree / "vllm"
    h = hashlib.sha256()
    count = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix == ".so":
            continue
        if p.name == "_vllm_fa3_C.py" and p.stat().st_size == 0:
            continue  # the import stub unpack_bundle adds
        rel = p.relative_to(tree).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        count += 1
    return {"vllm_sources_sha256": h.hexdigest(), "files": count}


def find_trees(
    bundle: str | Path | None,
    base: str | Path | None,
    patched: str | Path | None,
    site: str | Path | None,
    work: Path,
) -> tuple[Path, Path, Path | None, dict]:
    """(base tree, patched tree, site dir, bundle manifest): ``bundle`` unpacked
    under ``work`` (``unpack_bundle``), or else the ready trees ``base`` and
    ``patched`` (with ``site``, if given, and no manifest)."""
    if bundle:
        return unpack_bundle(Path(bundle), work)
    site = Path(site).resolve() if site else None
    if not (base and patched):
        raise SystemExit("give --bundle, or --base and --patched")
    return Path(base).resolve(), Path(patched).resolve(), site, {}


def unpack_bundle(bundle: Path, work: Path) -> tuple[Path, Path, Path, dict]:
    """Unpack a ``ci/device_bundle.py`` bundle: base tree, patched overlay,
    compiled modules into both trees, dependency wheels into ``work/site``.

    Returns (base tree, patched tree, site dir, the bundle's MANIFEST.json).
    """
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    base, patched = unpack_trees(bundle, work)
    site = install_wheels(bundle, work / "site")
    return base, patched, site, manifest


def _fresh(directory: Path) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def unpack_trees(bundle: Path, work: Path) -> tuple[Path, Path]:
    """``work/base`` and ``work/patched`` from the bundle, each with the
    compiled modules placed in it; both made afresh."""
    base, patched = _fresh(work / "base"), _fresh(work / "patched")
    with tarfile.open(bundle / "trees" / "base.tar.xz") as tf:
        tf.extractall(base, filter="data")
    shutil.copytree(base, patched, dirs_exist_ok=True)
    with tarfile.open(bundle / "trees" / "patched.tar.xz") as tf:
        tf.extractall(patched, filter="data")
    deleted = bundle / "trees" / "patched.deleted"
    if deleted.exists():
        for rel in deleted.read_text().split():
            (patched / rel).unlink(missing_ok=True)
    for xz in sorted((bundle / "so").rglob("*.so.xz")):
        rel = xz.relative_to(bundle / "so").with_suffix("")
        data = lzma.decompress(xz.read_bytes())
        for tree in (base, patched):
            (tree / rel).write_bytes(data)
            (tree / rel).chmod(0o755)
    for info in (bundle / "so").glob("*.dist-info"):
        for tree in (base, patched):
            shutil.copytree(info, tree / info.name, dirs_exist_ok=True)
    # vllm_flash_attn's compiled module is not carried; an empty stub lets the
    # package import (nothing here uses it).
    for tree in (base, patched):
        stub = tree / "vllm" / "vllm_flash_attn" / "_vllm_fa3_C.py"
        if stub.parent.is_dir() and not any(stub.parent.glob("_vllm_fa3_C*")):
            stub.write_text("")
    return base, patched


def install_wheels(bundle: Path, site: Path) -> Path:
    """The bundle's dependency wheels installed into ``site`` (made afresh),
    offline; put ``site`` on ``PYTHONPATH`` after the tree."""
    _fresh(site)
    wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(site),
                *wheels,
            ],
            check=True,
        )
    return site


def versions() -> dict:
    """Python, torch, Triton, transformers, CUDA, the GPU and its driver."""
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        out["triton"] = f"unavailable: {e}"
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception as e:  # pragma: no cover
        out["transformers"] = f"unavailable: {e}"
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = p.name
        out["sms"] = p.multi_processor_count
    with contextlib.suppress(Exception):
        out["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    return out


#: vLLM 0.33.0's NCCL loader (``pynccl_wrapper.py``) needs ncclCommSuspend and
#: ncclCommResume on CUDA, which NCCL exports from 2.29.7 on, although it calls
#: them only after ``has_symbol()``; on ROCm it already skips them when absent.
NCCL_WRAPPER = "vllm/distributed/device_communicators/pynccl_wrapper.py"
_SUSPEND_BRANCH = '                    elif func.name in ("ncclCommSuspend", "ncclCommResume"):\n'
_ROCM_ONLY_SKIP = (
    "                        if current_platform.is_rocm():\n                            continue\n"
)
_ALWAYS_SKIP = "                        continue\n"


def nccl_library() -> dict:
    """The NCCL that vLLM loads here (``libnccl.so.2``, already mapped by
    torch): its version and whether it exports ncclCommSuspend."""
    import ctypes

    import torch  # noqa: F401  (maps torch's NCCL, so the soname resolves)

    try:
        lib = ctypes.CDLL("libnccl.so.2")
    except OSError as e:
        return {"error": str(e)}
    code = ctypes.c_int()
    lib.ncclGetVersion(ctypes.byref(code))
    major, minor, patch = code.value // 10000, code.value // 100 % 100, code.value % 100
    return {"version": f"{major}.{minor}.{patch}", "suspend": hasattr(lib, "ncclCommSuspend")}


def skip_missing_nccl_suspend(trees: list[Path]) -> None:
    """Let each tree's NCCL loader skip ncclCommSuspend/Resume when the library
    lacks them, on CUDA as on ROCm. Without this, an NCCL older than 2.29.7
    disables vLLM's NCCL communicator, which the all-to-all of data parallel
    with expert parallel needs. Only sleep mode calls the two functions."""
    for tree in trees:
        path = tree / NCCL_WRAPPER
        head, branch, tail = path.read_text().partition(_SUSPEND_BRANCH)
        if not branch or _ROCM_ONLY_SKIP not in tail.partition("                    raise\n")[0]:
            raise RuntimeError(f"{path}: ncclCommSuspend branch not as in vLLM 0.33.0")
        path.write_text(head + branch + tail.replace(_ROCM_ONLY_SKIP, _ALWAYS_SKIP, 1))
