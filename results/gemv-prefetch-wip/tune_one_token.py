# SPDX-License-Identifier: Apache-2.0
"""Run the decode benchmark's --tune on a narrowed grid, so that the
prefetch question fits one device call: does loading the next step's tile
early help at one token?  The grid keeps the tile sizes the full sweep chose
or came close to at one token (decode-gemv-h200-wip/decode-tune.txt) and
crosses them with prefetch on and off.

Usage (in the patched tree with the candidate applied):
    python3 tune_one_token.py --tune --shapes ... --num-tokens 1 --json out.json
Every argument goes to the benchmark unchanged.
"""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "benchmark_moe_decode_gemv",
    Path.cwd() / "benchmarks" / "kernels" / "benchmark_moe_decode_gemv.py",
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench.TUNE_BLOCK_N = [4, 8, 16]
bench.TUNE_BLOCK_K = [256, 512, 1024, 2048]
bench.TUNE_BLOCK_E = [1, 4]
bench.TUNE_NUM_WARPS = [4]
sys.argv = [spec.origin, *sys.argv[1:]]
bench.main()
