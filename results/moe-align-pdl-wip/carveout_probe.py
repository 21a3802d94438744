"""Probe, not a patch: does leaving SMs free during the shared expert's GEMMs
shorten decode routing on the main stream as much as PDL does?

The batch-8 profiles show the main stream's short kernels (top-k, then the
alignment, then the activation) waiting beside the shared expert's GEMMs on
the side stream; PDL recovered top-k's wait. This times the same routing
graph as ``benchmark_triton_moe_align.py`` (router GEMM, softmax top-k,
``moe_align_block_size`` on the main stream; the shared expert's two GEMMs
on a second stream; 24 layers), with cuBLASLt for every GEMM (PyTorch's SM
carveout reaches only cuBLASLt) and the shared GEMMs captured under SM
carveouts of 0, 8, 16 and 32, for the op's alignment and the candidate's
Triton alignment with PDL. Then the shared GEMMs alone, to see what the
carveout costs them.

Run in the patched tree with the candidate applied (README.md); prints a
table, writes $OUT/carveout-probe.json.
"""

import json
import os
import statistics

import torch
from vllm.model_executor.layers.fused_moe.moe_align_block_size import (
    moe_align_block_size,
)
from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

HIDDEN, EXPERTS, TOPK, SHARED, BLOCK, LAYERS = 2048, 60, 4, 5632, 16, 24
CARVEOUTS = [0, 8, 16, 32]
TOKENS = [1, 8, 32]


def capture(num_tokens, carveout, triton_align, routing=True, shared=True):
    os.environ["VLLM_MOE_TRITON_ALIGN"] = "1" if triton_align else "0"
    os.environ["VLLM_MOE_TRITON_ALIGN_PDL"] = "1" if triton_align else "0"
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(num_tokens, HIDDEN, dtype=dt, device=dev)
    router = torch.randn(EXPERTS, HIDDEN, dtype=dt, device=dev)
    w13 = torch.randn(2 * SHARED, HIDDEN, dtype=dt, device=dev)
    w2 = torch.randn(HIDDEN, SHARED, dtype=dt, device=dev)
    side = torch.cuda.Stream()

    def step():
        if shared:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch._C._set_sm_carveout_experimental(carveout or None)
                gate_up = torch.mm(x, w13.t())
                torch.mm(gate_up[:, :SHARED], w2.t())
                torch._C._set_sm_carveout_experimental(None)
        if routing:
            logits = torch.mm(x, router.t())
            _, ids, _ = fused_topk(x, logits, TOPK, True)
            moe_align_block_size(ids, BLOCK, EXPERTS)
        if shared:
            torch.cuda.current_stream().wait_stream(side)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            step()
    return graph


def time_graphs(graphs, reps=200):
    times = {k: [] for k in graphs}
    for g in graphs.values():
        for _ in range(10):
            g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        for k, g in graphs.items():
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times[k].append(1000 * start.elapsed_time(end) / LAYERS)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    torch.backends.cuda.preferred_blas_library("cublaslt")
    rows = []
    print("us per layer; routing + shared GEMMs, and the shared GEMMs alone")
    print("tokens carveout  op-align  triton+pdl  shared-alone")
    for m in TOKENS:
        graphs = {}
        for c in CARVEOUTS:
            graphs[("op", c)] = capture(m, c, False)
            graphs[("pdl", c)] = capture(m, c, True)
            graphs[("shared", c)] = capture(m, c, False, routing=False)
        t = time_graphs(graphs)
        for c in CARVEOUTS:
            row = {
                "tokens": m,
                "carveout": c,
                "op_us": t[("op", c)],
                "triton_pdl_us": t[("pdl", c)],
                "shared_alone_us": t[("shared", c)],
            }
            rows.append(row)
            print(
                f"{m:6d} {c:9d} {row['op_us']:9.2f} {row['triton_pdl_us']:11.2f} "
                f"{row['shared_alone_us']:13.2f}"
            )
    with open(os.path.join(os.environ["OUT"], "carveout-probe.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
