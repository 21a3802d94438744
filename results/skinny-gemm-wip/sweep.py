"""Sweep two dense GEMV designs against cuBLAS at decode sizes (cold L2, graph
replay): the skinny GEMM candidate (tl.dot, 16 rows) and patch 5's decode w2
kernel used as a dense GEMV (one expert, top-k 1, router weight 1).

Run in the patched tree with the candidate applied (see README.md); writes
$OUT/sweep.json and prints the six fastest per shape and token count."""

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks/kernels")
from benchmark_skinny_gemm import copy_bandwidth, time_cold_replays  # noqa: E402
from vllm.model_executor.layers import triton_skinny_gemm as sk  # noqa: E402
from vllm.model_executor.layers.fused_moe import moe_decode_gemv as dec  # noqa: E402
from vllm.triton_utils import triton  # noqa: E402

SHAPES = {"o": (2048, 2048), "qkv": (6144, 2048), "down": (2048, 5632)}
DOT_CONFIGS = [
    sk.SkinnyGemmConfig(block_n=bn, block_k=bk, num_warps=4, num_stages=st)
    for bn, bk, st in itertools.product((16, 32), (64, 128, 256), (2, 3, 4))
]
FMA_CONFIGS = [
    (bn, bk)
    for bn, bk in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024))
    if bn * bk <= 16384
]
REPS = 30


def dot_call(x, w, config):
    return lambda: sk.skinny_gemm(x, w, None, config)


def fma_call(x, w, block_n, block_k):
    """The decode w2 kernel as out = x @ w.T: one expert, top-k 1, weight 1."""
    m, k = x.shape
    n = w.shape[0]
    ids = torch.zeros(m, 1, dtype=torch.int32, device="cuda")
    weights = torch.ones(m, 1, dtype=torch.float32, device="cuda")
    w3 = w.unsqueeze(0)
    out = torch.empty(m, n, dtype=x.dtype, device="cuda")

    def call():
        grid = (triton.cdiv(n, block_n) * m,)
        dec._moe_decode_w2_kernel[grid](
            x, w3, ids, weights, out, m, n, k,
            x.stride(0), w3.stride(0), w3.stride(1), out.stride(0),
            top_k=1, BLOCK_N=block_n, BLOCK_E=1, BLOCK_K=block_k,
            EVEN_K=k % block_k == 0, VEC=8, num_warps=4, num_stages=1,
        )  # fmt: skip
        return out

    return call


def sweep(x, w, flush):
    ref_us, ref = time_cold_replays(lambda: F.linear(x, w), flush, REPS)
    results = [("cublas", ref_us)]
    for c in DOT_CONFIGS:
        label = f"dot bn{c.block_n} bk{c.block_k} st{c.num_stages}"
        try:
            us, out = time_cold_replays(dot_call(x, w, c), flush, REPS)
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        except Exception as e:
            label, us = f"{label} ERR {type(e).__name__}", 1e9
        results.append((label, us))
    for block_n, block_k in FMA_CONFIGS:
        us, out = time_cold_replays(fma_call(x, w, block_n, block_k), flush, REPS)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        results.append((f"fma bn{block_n} bk{block_k}", us))
    return ref_us, sorted(results, key=lambda r: r[1])


def main():
    props = torch.cuda.get_device_properties(0)
    flush = torch.empty(4 * props.L2_cache_size, dtype=torch.uint8, device="cuda")
    ceiling = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
        for m in (1, 8):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref_us, results = sweep(x, w, flush)
            top = ", ".join(f"{a} {b:.1f}" for a, b in results[:6])
            print(f"{name} M={m}: cublas {ref_us:.1f} us | best: {top}", flush=True)
            rows.append({"shape": name, "n": n, "k": k, "m": m, "results": results})
    with open(os.path.join(os.environ["OUT"], "sweep.json"), "w") as f:
        json.dump({"device": props.name, "copy_bandwidth": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
