"""The engine side of ``ci/bench_e2e.py``: one ``vllm.LLM`` process on one tree.

``bench_e2e.py child`` runs these with the tree's ``vllm`` on ``sys.path``:
``child_time`` measures decode and prefill on dummy weights, ``child_check``
generates greedy tokens with logprobs on a real checkpoint and scores the fp32
reference's continuation teacher-forced, ``profile_step`` gives one step's GPU
time per kernel (and how much of it beside other GPU work) and its largest
host events, ``profile_decode`` the same per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path

from e2e_models import MODELS
from e2e_timeline import PER_STEP_TIMELINE, gpu_timeline, idle_gaps, time_beside_others

PREFILLS = ((1, 2048), (4, 2048))
DECODE_TOKENS = 128
PROMPT_LEN = 32
PROFILE_DECODE_BATCHES = (1, 8, 32)
PROFILE_DECODE_STEPS = 16
CHECK_TOKENS = 32
SEED = 20261130


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class GpuWaitTimer:
    """Wall time the host spends blocked in ``torch.cuda.Event.synchronize``:
    where vLLM's model runner waits for a step's sampled tokens and for its
    input copies. Long waits: the GPU sets the pace; almost none: the host
    does. The CPU share alone cannot tell, since a spinning wait burns CPU.
    The model runner may wait in a thread of its own, hence the lock."""

    def __init__(self) -> None:
        self._ms = 0.0
        self._lock = threading.Lock()

    def ms(self) -> float:
        return self._ms

    def install(self, event_cls) -> None:
        """Time every ``synchronize`` of ``event_cls`` from now on (once)."""
        if getattr(event_cls.synchronize, "_gpu_wait_timer", None) is self:
            return
        original = event_cls.synchronize

        def synchronize(event):
            start = time.perf_counter()
            try:
                return original(event)
            finally:
                with self._lock:
                    self._ms += (time.perf_counter() - start) * 1000

        synchronize._gpu_wait_timer = self
        event_cls.synchronize = synchronize


GPU_WAITS = GpuWaitTimer()


def prompts(count: int, length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(length)]}
        for _ in range(count)
    ]


def check_prompts() -> list[list[int]]:
    """Prompts of the correctness check: varied lengths, one long."""
    lengths = (5, 17, 33, 64, 100, 9, 511, 24)
    return [prompts(1, n, SEED + i)[0]["prompt_token_ids"] for i, n in enumerate(lengths)]


def _engine(model_dir: str, model: str, eager: bool, sizes: list[int], args, **kw):
    """The engine of one process. With ``args.dp`` > 1 it is one data-parallel
    rank (its rank, size and master come from the VLLM_DP_* environment, as
    in vLLM's offline data-parallel example) with expert parallelism."""
    from vllm import LLM

    compilation = {"mode": 0}
    if not eager:
        compilation |= {"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": sizes}
    if args.dp > 1:
        kw["enable_expert_parallel"] = True
    return LLM(
        model=model_dir,
        dtype="bfloat16",
        skip_tokenizer_init=True,
        attention_backend="TRITON_ATTN",
        enable_prefix_caching=False,
        enforce_eager=eager,
        compilation_config=compilation,
        seed=0,
        tensor_parallel_size=args.tp,
        **MODELS[model].get("engine_args", {}),
        **kw,
    )


def child_time(args: argparse.Namespace) -> dict:
    import torch
    import vllm
    from vllm import SamplingParams

    GPU_WAITS.install(torch.cuda.Event)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    llm = _engine(
        args.model_dir,
        args.model,
        args.mode == "eager",
        sorted(set(batches)),
        args,
        load_format="dummy",
        max_num_seqs=max(batches + [b for b, _ in PREFILLS]),
        max_model_len=4096,
        max_num_batched_tokens=max(b * n for b, n in PREFILLS),
        gpu_memory_utilization=0.85,
    )
    started = time.perf_counter() - t0

    def timed(ps: list[dict], n: int) -> float:
        sp = SamplingParams(
            max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False
        )
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        return (time.perf_counter() - t) * 1000

    decode, decode_state = {}, {}
    for b in batches:
        ps = prompts(b, PROMPT_LEN, SEED + b)
        timed(ps, 8)  # warm-up: kernels compiled, graphs touched
        decode[str(b)], decode_state[str(b)] = time_decode(timed, ps, args.reps)
        log(f"{args.tree} {args.model} {args.mode} batch {b}: {min(decode[str(b)]):.3f} ms/token")
    prefill, allocator = {}, {}
    for b, n in PREFILLS:
        ps = prompts(b, n, SEED + 7 * b)
        for _ in range(3):  # the first calls of a new shape run slow
            timed(ps, 1)
        before = allocator_counts()
        prefill[f"{b}x{n}"] = [timed(ps, 1) for _ in range(args.prefill_reps)]
        if args.dp == 1:  # a data-parallel rank's GPU work runs in its engine process
            allocator[f"{b}x{n}"] = {k: v - before[k] for k, v in allocator_counts().items()}
    result = {
        "vllm_file": vllm.__file__,
        **parallel_setup(llm),
        "start_s": started,
        "decode_ms": decode,
        "decode_state": decode_state,
        "prefill_ms": prefill,
        "prefill_allocator": allocator,
    }
    if args.profile:
        b, n = PREFILLS[0]
        result["profile"] = profile_step(lambda: timed(prompts(b, n, SEED + 7 * b), 1))
        result["profile"]["step"] = f"prefill {b}x{n}"
        result["decode_profiles"] = {
            str(b): profile_decode(timed, prompts(b, PROMPT_LEN, SEED + b), b)
            for b in PROFILE_DECODE_BATCHES
            if b in batches
        }
    return result


def time_decode(timed, ps: list[dict], reps: int) -> tuple[list[float], list[dict]]:
    """ms per output token of ``reps`` repetitions (a 1+T-token generation
    less a 1-token one, over T), and with each the state of the machine
    around its T-token generation: this process's CPU time over its wall
    time, the share of its wall time the host spent blocked on the GPU
    (`GpuWaitTimer`; near 0: the host, not the GPU, sets the pace) and
    ``machine_state`` right after it. A repetition slower than the others
    of its process can then be told apart by its cause."""
    per_token, states = [], []
    for _ in range(reps):
        one = timed(ps, 1)
        cpu, wait = time.process_time(), GPU_WAITS.ms()
        many = timed(ps, 1 + DECODE_TOKENS)
        cpu_ms = (time.process_time() - cpu) * 1000
        per_token.append((many - one) / DECODE_TOKENS)
        states.append(
            {
                "host_cpu_share": cpu_ms / many,
                "gpu_wait_share": (GPU_WAITS.ms() - wait) / many,
                **machine_state(),
            }
        )
    return per_token, states


def machine_state() -> dict:
    """What outside the tree can slow a step: the host's 1-minute load
    average, and the GPU's SM clock (MHz) and temperature (°C) through
    NVML. A reading that fails is None."""
    import torch

    readers = {
        "load1": lambda: os.getloadavg()[0],
        "sm_mhz": torch.cuda.clock_rate,
        "gpu_c": torch.cuda.temperature,
    }
    state: dict = {}
    for key, read in readers.items():
        try:
            state[key] = read()
        except Exception:  # no NVML binding, a driver or sandbox without the query
            state[key] = None
    return state


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's counters that show device allocations
    (cudaMalloc / cudaFree, each a device-wide sync) and retries after a
    failed allocation: a step whose tensors no longer fit the cached blocks."""
    import torch

    stats = torch.cuda.memory_stats()
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {k: int(stats.get(k, 0)) for k in keys}


def profile_step(step, top_host: int = 40, gaps_after: int | None = None) -> dict:
    """GPU time per kernel name over one call of ``step`` (already warm), with
    the part of it run beside another activity (``time_beside_others``), its
    wall time, the host events that took most self time (Python ops and CUDA
    runtime calls such as cudaMalloc or a stream sync), ``gpu_timeline`` of
    its device activities and their number: where a step's time goes, and how
    much of it no kernel accounts for. With ``gaps_after``, also the
    ``idle_gaps`` of the activities after the first ``gaps_after``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall_ms = step()
    activities = [
        (evt.name, evt.time_range.start, evt.time_range.end)
        for evt in prof.events()
        if evt.device_type == torch.autograd.DeviceType.CUDA
    ]
    beside = time_beside_others(activities)
    kernels, host = {}, {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(evt, "self_device_time_total", 0)
            if us > 0:
                kernels[evt.key] = {
                    "count": evt.count,
                    "us": us,
                    "beside_us": beside.get(evt.key, 0.0),
                }
        elif evt.self_cpu_time_total > 0:
            host[evt.key] = {"count": evt.count, "us": evt.self_cpu_time_total}
    kept = sorted(host, key=lambda k: -host[k]["us"])[:top_host]
    return {
        "wall_ms": wall_ms,
        "kernels": kernels,
        "host": {k: host[k] for k in kept},
        "timeline": gpu_timeline([(start, end) for _, start, end in activities]),
        "activities": len(activities),
        **({} if gaps_after is None else {"gaps": idle_gaps(activities, skip=gaps_after)}),
    }


def profile_decode(timed, ps: list[dict], batch: int) -> dict:
    """``profile_step`` of one decode step at this batch: a profile of the
    prefill plus PROFILE_DECODE_STEPS decode steps, less one of the prefill
    alone, per step (kernel counts too), so the prompt's own kernels cancel.
    The GPU's idle gaps are not subtracted: the prefill's, which the host
    paces under the profiler, differ by milliseconds between two profiles.
    They are those of the longer profile after as many activities as the
    prefill alone ran, per step."""
    one = profile_step(lambda: timed(ps, 1))
    many = profile_step(lambda: timed(ps, 1 + PROFILE_DECODE_STEPS), gaps_after=one["activities"])

    def per_step(section: str) -> dict:
        out = {}
        for name, evt in many[section].items():
            less = one[section].get(name, {})
            us = (evt["us"] - less.get("us", 0.0)) / PROFILE_DECODE_STEPS
            if us > 0:
                out[name] = {
                    field: (evt[field] - less.get(field, 0.0)) / PROFILE_DECODE_STEPS
                    for field in evt
                }
        return out

    def timeline_per_step() -> dict:
        # Busy times add up over the steps; a span and its idle time do not:
        # they also hold the host's time between steps, which varies under the
        # profiler, so the difference of two spans says nothing per step.
        less, more = one["timeline"], many["timeline"]
        return {k: (more[k] - less[k]) / PROFILE_DECODE_STEPS for k in PER_STEP_TIMELINE}

    return {
        "step": f"decode batch {batch}, per step",
        "wall_ms": (many["wall_ms"] - one["wall_ms"]) / PROFILE_DECODE_STEPS,
        "kernels": per_step("kernels"),
        "host": per_step("host"),
        "idle_gaps": {
            pair: {field: value / PROFILE_DECODE_STEPS for field, value in gap.items()}
            for pair, gap in many["gaps"].items()
        },
        "timeline": timeline_per_step(),
    }


def child_check(args: argparse.Namespace) -> dict:
    from vllm import SamplingParams

    llm = _engine(
        args.model_dir,
        args.model,
        False,
        [1, 2, 4, 8, 16],
        args,
        load_format="auto",
        max_num_seqs=16,
        max_model_len=2048,
        kv_cache_memory_bytes=4 << 30,
        gpu_memory_utilization=0.4,
    )
    sp = SamplingParams(
        max_tokens=CHECK_TOKENS,
        min_tokens=CHECK_TOKENS,
        ignore_eos=True,
        temperature=0.0,
        logprobs=5,
        detokenize=False,
    )
    ps = [{"prompt_token_ids": p} for p in check_prompts()]

    def run(batch: list[dict]) -> list[dict]:
        outs = llm.generate(batch, sp, use_tqdm=False)
        return [
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [
                    {str(t): lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs
                ],
            }
            for o in outs
        ]

    # Teacher-forced: the fp32 reference's own continuation as the prompt;
    # the log-probability each tree gives every reference token, and its rank.
    ref = json.loads(Path(args.ref).read_text())
    forced_in = [
        {"prompt_token_ids": p["prompt_token_ids"] + toks}
        for p, toks in zip(ps, ref["ref_tokens"], strict=True)
    ]
    forced_sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    forced = []
    for p, o in zip(forced_in, llm.generate(forced_in, forced_sp, use_tqdm=False), strict=True):
        ids = p["prompt_token_ids"]
        start = len(ids) - CHECK_TOKENS
        forced.append(
            [
                {
                    "logprob": o.prompt_logprobs[j][ids[j]].logprob,
                    "rank": o.prompt_logprobs[j][ids[j]].rank,
                }
                for j in range(start, len(ids))
            ]
        )
    # Batch 1 (the decode graph of one sequence), then all prompts together.
    return {"single": run(ps[:1]), "batch": run(ps), "forced": forced, **parallel_setup(llm)}


def parallel_setup(llm) -> dict:
    """How the engine spread the model: sizes, expert parallelism and the
    all-to-all backend vLLM picked (with expert parallelism)."""
    pc = llm.llm_engine.vllm_config.parallel_config
    return {
        "parallel": {
            "tp": pc.tensor_parallel_size,
            "dp": pc.data_parallel_size,
            "dp_rank": pc.data_parallel_rank,
            "expert_parallel": pc.enable_expert_parallel,
            "all2all_backend": pc.all2all_backend if pc.enable_expert_parallel else None,
        }
    }


def child_main(args: argparse.Namespace) -> int:
    result = {"model": args.model, "tree": args.tree, "mode": args.mode}
    try:
        result |= child_check(args) if args.check else child_time(args)
    except Exception as e:  # the parent records it and goes on
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    Path(args.json).write_text(json.dumps(result))
    return 0
