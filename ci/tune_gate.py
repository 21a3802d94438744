#!/usr/bin/env python3
"""Graph-replay time of the shared-expert gate kernel for several launch
configurations (rows per program x warps) next to the heuristic's choice.

Runs on the GPU device inside the patched tree, e.g. after
``python3 ci/bench_gate.py device --bundle .device/bundle --work /tmp/bg``::

    cd /tmp/bg/patched && PYTHONPATH=$PWD:/tmp/bg/site python3 /path/to/ci/tune_gate.py
"""

import itertools
import math
import sys

import torch
from vllm.model_executor.layers.fused_moe import shared_expert_gate as gate

sys.path.insert(0, "benchmarks/kernels")
from benchmark_shared_expert_gate import bench_graph  # noqa: E402

SHAPES = [(4096, 4096), (2048, 4096), (4096, 1024), (4096, 16384), (2048, 16384)]  # (K, N)
COPY_BYTES_PER_S = 3.0e12  # the 1 GiB copy ceiling measured by the benchmark


def pct(num_bytes: int, us: float) -> str:
    return f"{100 * num_bytes / (us * 1e-6) / COPY_BYTES_PER_S:.1f}%"


def main() -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for K, N in SHAPES:
        num_bytes = (N * 3 * K + K) * 2
        num_sets = max(1, min(32, math.ceil(4 * l2 / num_bytes)))
        inputs = []
        for _ in range(num_sets):
            x = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
            w = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
            out = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
            inputs.append((x, w, out, torch.empty_like(out)))
        chosen = gate._heuristic_config(N, K, K, 2)
        timed = []
        for block_m, warps in itertools.product([1, 2, 4], [4, 8, 16]):
            cfg = (block_m, chosen[1], chosen[2], chosen[3], warps)

            def fn(x, w, out, y, cfg=cfg):
                gate._launch(x, w, out, y, cfg)

            us = min(bench_graph(fn, inputs, max(num_sets, 32)) for _ in range(3))
            timed.append((us, cfg))
        timed.sort()

        mine = next(us for us, cfg in timed if cfg == chosen)
        best = "; ".join(
            f"{c[0]} rows x {c[4]} warps {us:.2f} us {pct(num_bytes, us)}" for us, c in timed[:4]
        )
        print(f"K={K} N={N}: heuristic {chosen} {mine:.2f} us {pct(num_bytes, mine)}; best: {best}")


if __name__ == "__main__":
    main()
