"""Patch 5's decode kernels at one token with the w13 kernel prefetching w2
into L2 (before its own loads, after them) against no prefetch, alone and
beside a shared-expert-sized pair of GEMMs on a second stream, as in vLLM's
engine. CUDA-graph replays on a cold L2; run in a tree with
`moe-decode-prefetch-w2.patch` applied.

    PYTHONPATH=<tree>:<site> python3 probe.py --json probe.json
"""

import argparse
import dataclasses
import functools
import json
import statistics

import torch
from vllm.model_executor.layers.fused_moe import moe_decode_gemv as decode

# hidden, moe_intermediate_size, routed experts, top-k, shared expert width
SHAPES = {
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 5632),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0),
    "qwen3-next-80b-a3b": (2048, 512, 512, 10, 512),
}
SLEEP_CYCLES = 200_000


def timed(fn, flush, reps, side=None):
    """Median µs of a graph replay of fn (and side, on a second stream
    forked and joined inside the graph) on a cold L2."""
    stream = torch.cuda.Stream()
    fn(), side and side()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if side is not None:
            fork = torch.cuda.Event()
            fork.record()
            with torch.cuda.stream(stream):
                fork.wait(stream)
                side()
                join = torch.cuda.Event()
                join.record(stream)
        out = fn()
        if side is not None:
            join.wait()
    times = []
    for _ in range(reps):
        flush.sum()
        torch.cuda._sleep(SLEEP_CYCLES)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times) * 1e3, out.clone()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    flush = torch.empty(4 * l2 // 4, dtype=torch.float32, device="cuda")
    print(f"{torch.cuda.get_device_name()}, L2 {l2 / 2**20:.0f} MiB")
    print(
        f"{'shape':<20} {'beside':<7} {'none us':>8} {'before us':>10} "
        f"{'after us':>9} {'before/none':>12} {'after/none':>11}"
    )
    rows = []
    for name in args.shapes:
        hidden, inter, experts, top_k, shared = SHAPES[name]
        dtype = torch.bfloat16
        w1 = torch.randn(experts, 2 * inter, hidden, dtype=dtype, device="cuda") * 0.02
        w2 = torch.randn(experts, hidden, inter, dtype=dtype, device="cuda") * 0.02
        x = torch.randn(1, hidden, dtype=dtype, device="cuda")
        topk_ids = torch.randperm(experts, device="cuda")[:top_k].view(1, -1)
        topk_ids = topk_ids.to(torch.int32)
        topk_weights = torch.rand(1, top_k, device="cuda")
        out = torch.empty_like(x)
        scratch = torch.empty(top_k * inter, dtype=dtype, device="cuda")
        w13_default, w2_default = decode.default_launch_configs(
            hidden, inter, 1, top_k, 2, decode._num_sms(0)
        )
        sides = {"alone": None}
        if shared:
            wgu = torch.randn(2 * shared, hidden, dtype=dtype, device="cuda") * 0.02
            wd = torch.randn(hidden, shared, dtype=dtype, device="cuda") * 0.02
            sx = torch.randn(1, hidden, dtype=dtype, device="cuda")

            def shared_expert(sx=sx, wgu=wgu, wd=wd, shared=shared):
                gu = sx @ wgu.t()
                return (torch.nn.functional.silu(gu[:, :shared]) * gu[:, shared:]) @ wd.t()

            sides["shared"] = shared_expert
        for beside, side in sides.items():
            weight_mb = top_k * 3 * inter * hidden * 2 / 1e6
            row = {"shape": name, "beside": beside, "weight_mb": weight_mb}
            outs = {}
            for label, prefetch in (("none", 0), ("before", 1), ("after", 2)):
                config = dataclasses.replace(w13_default, prefetch_w2=prefetch)
                call = functools.partial(
                    decode.moe_decode_gemv,
                    x,
                    w1,
                    w2,
                    topk_weights,
                    topk_ids,
                    out,
                    scratch,
                    config,
                    w2_default,
                )
                row[f"{label}_us"], outs[label] = timed(call, flush, args.reps, side)
            row["identical"] = all(torch.equal(outs["none"], o) for o in outs.values())
            rows.append(row)
            print(
                f"{name:<20} {beside:<7} {row['none_us']:>8.1f} {row['before_us']:>10.1f} "
                f"{row['after_us']:>9.1f} {row['before_us'] / row['none_us']:>12.3f} "
                f"{row['after_us'] / row['none_us']:>11.3f}"
                + ("" if row["identical"] else "  OUTPUTS DIFFER"),
                flush=True,
            )
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name()
            json.dump({"device": device, "l2_bytes": l2, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
