"""Probe: patch 8's split-K router GEMM kernel on A2.7B's dense projections.

In the final series' batch-32 profile the qkv and o projections read their
weights at 2.54 and 1.40 TB/s (cuBLAS, M = 32), the largest gap to the routed
experts' 4.55 TB/s in the step (`../e2e-h200-series12-final/README.md`). This
times `triton_router_gemm` (split over N in 16-wide blocks and over K, the last
program per N block reducing in a fixed order) against `F.linear` on those
shapes, as CUDA-graph replays on a cold L2 with the timer of
`benchmarks/kernels/benchmark_moe_decode_gemv.py`, and checks the outputs
against each other. No bias: the qkv projection's bias add is left out of both.

Run from a tree with patch 8 (its benchmarks/kernels on the path):
    python3 probe.py --json probe.json
"""

import argparse
import functools
import json
import sys

import torch

sys.path.insert(0, "benchmarks/kernels")
from benchmark_moe_decode_gemv import time_cold_replays  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import (  # noqa: E402
    triton_router_gemm as trg,
)

# (output features, input features): Qwen1.5-MoE-A2.7B
SHAPES = {"o": (2048, 2048), "qkv": (6144, 2048)}
NUM_TOKENS = [1, 8, 16, 32]
# (block_k, split_k, num_stages, num_warps); None = the kernel's default split
CONFIGS = [(256, None, 2, 4), (128, None, 2, 4), (256, 4, 2, 4), (256, 2, 2, 4), (512, 1, 3, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    flush = torch.empty(4 * l2, dtype=torch.uint8, device="cuda")
    rows = []
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        weight = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).bfloat16()
        sem = trg.router_gemm_semaphores(n, torch.device("cuda"))
        mbytes = n * k * 2 / 1e6
        for m in NUM_TOKENS:
            x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
            linear = functools.partial(torch.nn.functional.linear, x, weight)
            ref_us, ref = time_cold_replays(linear, flush, args.reps)
            row = {"shape": name, "n": n, "k": k, "m": m, "F.linear_us": round(ref_us, 2)}
            best = None
            for bk, sk, st, nw in CONFIGS:
                fn = functools.partial(
                    trg.triton_router_gemm,
                    x,
                    weight,
                    sem,
                    block_k=bk,
                    split_k=sk,
                    num_stages=st,
                    num_warps=nw,
                )
                us, out = time_cold_replays(fn, flush, args.reps)
                err = (out.float() - ref.float()).abs().max().item()
                key = f"{bk}/{sk}/{st}/{nw}"
                row[key] = round(us, 2)
                row[key + "_maxerr"] = round(err, 4)
                if best is None or us < best[1]:
                    best = (key, us)
            row["best"] = best[0]
            row["best_over_F.linear"] = round(best[1] / ref_us, 3)
            print(
                f"{name:4s} M={m:2d} {mbytes:5.1f} MB  F.linear {ref_us:6.2f} us "
                f"({mbytes / ref_us:4.2f} TB/s)  best {best[0]:14s} {best[1]:6.2f} us "
                f"({mbytes / best[1]:4.2f} TB/s)  ratio {best[1] / ref_us:.3f}",
                flush=True,
            )
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
