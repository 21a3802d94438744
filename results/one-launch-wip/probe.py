# SPDX-License-Identifier: Apache-2.0
"""Does running patch 5's two decode kernels as one launch pay, and does the
L2 prefetch of the w2 weights while the w2 programs wait matter?

For each shape and token count: `moe_decode_gemv` at its default launch
configurations as two launches, as one launch with the prefetch, and as one
launch without it; µs per CUDA-graph replay on a cold L2 (the benchmark's
timer), % of the 1 GiB copy, and whether the outputs are equal bit for bit.

Usage (in the patched tree with the candidate applied):
    python3 probe.py [--reps 50] [--json out.json]
"""

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "benchmark_moe_decode_gemv",
    Path.cwd() / "benchmarks" / "kernels" / "benchmark_moe_decode_gemv.py",
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
decode = bench.decode

SHAPES = [
    "qwen1.5-moe-a2.7b",
    "qwen3-30b-a3b",
    "qwen3-next-80b-a3b",
    "qwen1.5-moe-a2.7b+shared",
    "qwen3-next-80b-a3b+shared",
]
VARIANTS = ("two_launches", "one_launch", "one_launch_no_prefetch")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--num-tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    flush, ceiling, result = bench.cold_l2_setup("bfloat16")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, shape, num_tokens, call_args, num_bytes in bench.cases(
        SHAPES, args.num_tokens, torch.bfloat16
    ):
        hidden, inter = shape[:2]
        w13, w2 = decode.default_launch_configs(
            hidden, inter, num_tokens, call_args[4].shape[1], 2, num_sms
        )
        no_prefetch = dataclasses.replace(w2, prefetch_l2=False)
        calls = {
            "two_launches": bench.decode_call(*call_args, w13, w2, False),
            "one_launch": bench.decode_call(*call_args, w13, w2, True),
            "one_launch_no_prefetch": bench.decode_call(*call_args, w13, no_prefetch, True),
        }
        row = {"shape": name, "num_tokens": num_tokens, "weight_bytes": num_bytes}
        outs = {}
        for variant in VARIANTS:
            us, outs[variant] = bench.time_cold_replays(calls[variant], flush, args.reps)
            row[f"{variant}_us"] = us
            row[f"{variant}_pct_copy"] = 100 * num_bytes / (us * 1e-6) / ceiling
        row["equal"] = all(torch.equal(outs[v], outs["two_launches"]) for v in VARIANTS)
        rows.append(row)
        print(
            f"{name:<26} M={num_tokens} {num_bytes / 1e6:6.1f} MB  "
            + "  ".join(
                f"{v} {row[v + '_us']:6.1f} us ({row[v + '_pct_copy']:4.1f}%)" for v in VARIANTS
            )
            + f"  equal={row['equal']}",
            flush=True,
        )
    result["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
