#!/usr/bin/env python3
"""Time apply.py: cold (download included), fresh tree from cache, no-op re-run.

Runs apply.py as a user would, in subprocesses, with a throwaway cache and
target, and writes the numbers to results/build-times.json.

    python ci/time_build.py [--out results/build-times.json]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "apply.py"), *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "build-times.json")
    parser.add_argument("--source", default="sdist")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="time-build-"))
    env = {**os.environ, "VLLM_MOE_PATCHES_CACHE": str(scratch / "cache")}
    try:
        first, second = scratch / "a" / "vllm", scratch / "b" / "vllm"
        common = ["apply", "--source", args.source, "-q"]
        result = {
            "cold_s": timed([*common, "--target", str(first)], env),
            "from_cache_s": timed([*common, "--target", str(second)], env),
            "noop_s": min(timed([*common, "--target", str(second)], env) for _ in range(3)),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(
        {
            "source": args.source,
            "machine": (
                f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
            ),
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
