#!/usr/bin/env python3
"""Host time per call of the Qwen shared-expert gate, reference vs fused (GPU).

Runs ON the GPU device, in a tree from the device bundle: eager callers (no
CUDA graph, no torch.compile) pay each call's Python and launch cost on the
host, which at decode batch sizes is more than the GPU time. The GPU sleeps
while each batch of calls is issued, so launches only queue and the wall time
per call is host time. Min and median over ``--reps`` batches of ``--calls``.

    cd <tree> && python3 <repo>/ci/gate_host_cost.py --json $OUT/gate-host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def host_us(fn, calls: int, reps: int) -> tuple[float, float]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)  # ~10 ms: longer than a batch of calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return min(per_call), statistics.median(per_call)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=40, help="per batch (far below the launch queue)")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe import shared_expert_gate as sg
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.triton_utils import tl, triton

    @triton.jit
    def copy_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="nccl",
            distributed_init_method=f"file://{tempfile.mktemp()}",
        )
        initialize_model_parallel(1, 1)
        gate = ReplicatedLinear(
            args.hidden, 1, bias=False, params_dtype=torch.bfloat16, prefix="gate"
        ).cuda()
    n, h = args.tokens, args.hidden
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    out = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(out)
    buf = torch.zeros(1024, device="cuda")
    config = sg._heuristic_config(n, h, h, x.element_size())
    # The weight as the fused path hands it to the checks and the launch.
    weight = sg._fusable_gate_weight(gate)
    rows = {
        "reference: F.sigmoid(gate(x)[0]) * out": lambda: F.sigmoid(gate(x)[0]) * out,
        "fused: apply_shared_expert_gate(gate, x, out)": lambda: sg.apply_shared_expert_gate(
            gate, x, out
        ),
        "  of which the kernel launch": lambda: sg._launch(x, weight, out, y, config),
        "  of which the input checks": lambda: sg._kernel_supports(x, weight, out),
        "  of which the gate-layer checks": lambda: sg._fusable_gate_weight(gate),
        "floor: a one-argument Triton kernel launch": lambda: copy_kernel[(1,)](
            buf, 1024, BLOCK=1024
        ),
        "floor: one ATen op (torch.sigmoid)": lambda: torch.sigmoid(out),
    }
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "tokens": n,
        "hidden": h,
        "calls": args.calls,
        "reps": args.reps,
        "rows": [],
    }
    print(f"host us per call, N={n}, hidden={h} ({result['device']}): min, median")
    for name, fn in rows.items():
        lo, med = host_us(fn, args.calls, args.reps)
        result["rows"].append({"what": name, "min_us": round(lo, 2), "median_us": round(med, 2)})
        print(f"{lo:8.2f} {med:8.2f}  {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
