"""GPU time of softmax top-k routing in CUDA graphs, patched tree: vLLM's
``fused_topk`` (patch 6's Triton kernel at 40 and 60 experts) against the
``topk_softmax`` op alone (``moeSoftmax`` + ``moeTopK`` at those counts), at 1
to 1,024 tokens. The eager ``do_bench`` of ``benchmark_fused_topk.py`` also
counts host time where a call is short; a graph replay does not.

Run in the patched tree (see README.md); prints a table, writes
$OUT/topk-graph.json."""

import json
import os

import torch
import triton
import vllm._custom_ops as ops
from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

NUM_TOKENS = [1, 4, 16, 64, 256, 1024]
NUM_EXPERTS = [40, 60, 64]  # 64: the op's fused kernel on both trees
TOPK = [4, 8]


def op_call(gating, topk):
    m = gating.shape[0]
    weights = torch.empty(m, topk, dtype=torch.float32, device="cuda")
    ids = torch.empty(m, topk, dtype=torch.int32, device="cuda")
    indices = torch.empty(m, topk, dtype=torch.int32, device="cuda")
    return lambda: ops.topk_softmax(weights, ids, indices, gating, True)


def main():
    rows = []
    print("tokens experts topk  fused_topk us  op us  fused/op")
    for m, e, k in [(m, e, k) for m in NUM_TOKENS for e in NUM_EXPERTS for k in TOPK]:
        hidden = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
        gating = torch.randn(m, e, dtype=torch.bfloat16, device="cuda")
        ours = triton.testing.do_bench_cudagraph(
            lambda h=hidden, g=gating, k=k: fused_topk(h, g, k, True), rep=50, return_mode="median"
        )
        op = triton.testing.do_bench_cudagraph(op_call(gating, k), rep=50, return_mode="median")
        print(f"{m:6d} {e:7d} {k:4d}  {1e3 * ours:13.2f}  {1e3 * op:5.2f}  {ours / op:8.3f}")
        rows.append({"tokens": m, "experts": e, "topk": k, "fused_topk_ms": ours, "op_ms": op})
    device = torch.cuda.get_device_name()
    with open(os.path.join(os.environ["OUT"], "topk-graph.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
