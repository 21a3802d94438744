"""How much host time one CUDA-graph launch costs, by the graph's shape.

At batch 1 the patched engine's host waits on the GPU for 1 % of the wall
(results/e2e-h200-series12-final/), so the host sets the pace there. Its
profile puts `cudaGraphLaunch` at 1.3-1.7 us of host time per kernel node of
the decode graph (base 650 nodes, 1,090 us; patched 458, 766 us), but that
was under CUPTI. This probe times `CUDAGraph.replay()` on the host without a
profiler, for graphs of N kernel nodes:

- `serial`: N kernels on one stream;
- `forked`: the same, with a side-stream fork and join every 19 nodes (the
  MoE block's shared experts, once per layer);
- `pdl`: `serial` with every 19th kernel a Triton kernel launched with
  programmatic dependent launch (patch 7's top-k kernel, once per layer).

Each replay is timed alone (the GPU idle before it) and back to back (the
previous replays still running), in microseconds of host time per launch.
Run: python3 graph_launch_probe.py [--out probe.json]
"""

import argparse
import json
import statistics
import time

import torch
import triton
import triton.language as tl

PER_LAYER = 19


@triton.jit
def _bump(x_ptr):
    tl.extra.cuda.gdc_wait()
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def _graph(nodes: int, shape: str) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """The graph, and what it writes and runs on: the caller keeps that
    alive for as long as it replays the graph."""
    x = torch.zeros(1024, device="cuda")
    y = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    # Warm the Triton kernel outside capture.
    _bump[(1,)](x, launch_pdl=True)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        main = torch.cuda.current_stream()
        for i in range(nodes):
            if shape == "forked" and i % PER_LAYER == 0:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    y.add_(1)
                main.wait_stream(side)
            elif shape == "pdl" and i % PER_LAYER == 0:
                _bump[(1,)](x, launch_pdl=True)
            else:
                x.add_(1)
    return g, (x, y, side)


def _time(g: torch.cuda.CUDAGraph, reps: int, back_to_back: bool) -> float:
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    host = []
    for _ in range(reps):
        if not back_to_back:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(host)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for shape in ("serial", "forked", "pdl"):
        for nodes in (100, 250, 460, 650):
            g, operands = _graph(nodes, shape)
            alone = _time(g, args.reps, back_to_back=False)
            queued = _time(g, args.reps, back_to_back=True)
            rows.append({"shape": shape, "nodes": nodes, "alone_us": alone, "queued_us": queued})
            print(
                f"{shape:7s} {nodes:4d} nodes: host {alone:7.1f} us alone, "
                f"{queued:7.1f} us back to back ({alone / nodes:.2f} / "
                f"{queued / nodes:.2f} us per node)",
                flush=True,
            )
            del g, operands
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
