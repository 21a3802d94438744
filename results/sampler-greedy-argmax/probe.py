"""Greedy sampling in vLLM's V2 sampler: the Gumbel kernel at temperature 0
against `argmax`, GPU time and host time, on the device.

For batches of 1 to 32 rows of Qwen's 151,936-token vocabulary (bf16 and
fp32 logits), checks that both give the same tokens, then times:
- GPU µs per call: 20 calls captured in one CUDA graph, replayed `--reps`
  times between two events (the logits stay in L2, as after the LM head);
- host µs per call: the eager call without synchronizing, averaged over
  `--reps` calls (the time the engine's thread spends launching it).

Run from a built patched vLLM tree (only `gumbel_sample` is imported, which
is the same on both trees): python3 probe.py --json probe.json
"""

import argparse
import functools
import json
import statistics
import time

import torch
from vllm.v1.worker.gpu.sample.gumbel import gumbel_sample

VOCAB = 151936
CALLS_PER_GRAPH = 20


def gpu_us(fn, reps: int) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * CALLS_PER_GRAPH))
    return statistics.median(times)


def host_us(fn, reps: int) -> float:
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e6 / reps)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}; µs per call, median of 5")
    print("rows dtype  | kernel GPU  argmax GPU | kernel host  argmax host")
    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 4, 8, 16, 32):
            gen = torch.Generator(device="cuda").manual_seed(m)
            logits = torch.randn(m, VOCAB, device="cuda", generator=gen).to(dtype)
            idx = torch.arange(m, dtype=torch.int32, device="cuda")
            temp = torch.zeros(m, dtype=torch.float32, device="cuda")
            seed = torch.arange(m, dtype=torch.int64, device="cuda")
            pos = torch.arange(m, dtype=torch.int64, device="cuda")

            kernel = functools.partial(
                gumbel_sample,
                logits,
                idx,
                temp,
                seed,
                pos,
                apply_temperature=False,
                is_drafting=False,
            )
            argmax = functools.partial(torch.argmax, logits, dim=-1)

            assert torch.equal(kernel(), argmax())
            row = {
                "rows": m,
                "dtype": str(dtype).removeprefix("torch."),
                "kernel_gpu_us": gpu_us(kernel, args.reps),
                "argmax_gpu_us": gpu_us(argmax, args.reps),
                "kernel_host_us": host_us(kernel, args.reps * 4),
                "argmax_host_us": host_us(argmax, args.reps * 4),
            }
            rows.append(row)
            print(
                f"{m:4d} {row['dtype']:8s}| {row['kernel_gpu_us']:9.2f} "
                f"{row['argmax_gpu_us']:11.2f} | {row['kernel_host_us']:11.2f} "
                f"{row['argmax_host_us']:12.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
