#!/usr/bin/env python3
"""Layer-level A/B benchmark of vLLM's own Qwen MoE blocks: base vs patched tree.

Runs ON the GPU device (issue 9). Two vLLM trees cannot share one interpreter,
so the parent starts one long-lived worker process per tree (``base`` and
``patched``), each with its tree first on ``PYTHONPATH``, and drives both over
a pipe, one at a time, so the GPU only ever runs one of them:

* each worker builds vLLM's own sparse-MoE block classes
  (``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``,
  ``Qwen3NextSparseMoeBlock``) outside the engine, the way a previous session
  measured it works: a default ``VllmConfig`` made current, a one-rank
  distributed group, the workspace manager, construction under
  ``torch.device("cuda")`` in bf16, then the model loader's
  ``process_weights_after_loading`` step on every module with a quant method;
* weights are random bf16 drawn per parameter from a generator seeded by
  (seed, parameter name), inputs per (seed, config, N): base and patched see
  identical weights and inputs, and the parent checks the weight checksums
  of both workers are equal before timing anything;
* for each config and N the parent alternates base and patched (order
  flipped every round and every N: ABBA; with ``--aa`` all six orders of
  three workers in turn) for ``--rounds`` rounds after one discarded warm-up
  round. A measurement is the median of single calls, each timed with CUDA
  events after a 256 MiB buffer is zeroed (cold L2, as ``do_bench`` does, and
  as in a model whose other layers evict this one's weights): eager
  (``block(x)`` in a forward context) and CUDA-graph replay of one forward.
  ``--flush-mb 0`` times hot-L2 back-to-back loops instead (then 512-expert
  blocks at N=1, whose ~70 MB working set is close to the 50 MB L2, showed a
  per-process A/A bias of up to 12%: placement decides what stays in L2);
* every worker saves its eager output per (config, N) to disk; the parent
  compares base vs patched (bf16 rounding) and graph vs eager;
* one forward per config at N=1 is profiled (torch.profiler): device kernels
  in order with their times, and the device-to-device copies; with
  ``--cold-replays K`` also K cold graph replays, one timeline per replay.

Spread: for each (config, N, mode) the per-round times of the *same* tree
differ only by noise. ``noise_pct`` is the largest deviation of a base round
from the base median (base vs base within one process, in %). With ``--aa`` a
third worker runs the base tree again, timed in the same rotation, and
``aa_ratio`` = base median / base2 median catches the process-to-process part
(allocation layout, CPU placement) that rounds inside one process cannot see.
``--also LABEL=TREE`` (repeatable) adds further workers to the same rotation,
reported as base / LABEL: a second process of the patched tree, or a
diagnostic variant made by ``ci/layer_variants.py`` (``ci/device_race.sh``).
``spread_pct`` = max(noise_pct, |aa_ratio - 1| * 100, ``--spread-floor``)
(floor 1%: the A/A run on the H100 showed base vs base within 0.7% under
graphs except one shape). The per-round speed-up ratios' min/max are reported
too. "slower than base beyond the spread" means
``patched_median / base_median - 1 > spread_pct``. Eager timings are
dominated by host-side dispatch (~1-2 ms against ~60-300 us on the device)
and vary by tens of % between calls and processes; the bar is on graphs.

Usage on the device (see the README / issue 9 for the ``run`` call)::

    python3 ci/bench_layers.py run --bundle .device/layers/bundle --out $OUT

``--bundle`` is a folder packed here by ``ci/device_bundle.py build --out ...``
(base tree, patched overlay, sm_90-trimmed compiled modules, dependency
wheels); it is unpacked under ``--work`` and the wheels installed into
``<work>/site``. Or pass ready trees with ``--base DIR --patched DIR``.
Writes ``<out>/layers.json`` (rewritten after every config, so a run cut short
still leaves its partial results), and ``<out>/worker-<label>.log`` when a
worker failed (or with ``--keep-logs``). vLLM's environment applies to both
trees: e.g. ``VLLM_DISABLE_SHARED_EXPERTS_STREAM=1`` runs the shared expert
serially instead of on the aux stream (the engine's default for N <= 256).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

# --------------------------------------------------------------------------
# configs (published model dimensions)
# --------------------------------------------------------------------------

#: name -> block class and HF-style config fields. ``hf`` names the
#: transformers config class; ``block`` the vLLM module and class.
CONFIGS: dict[str, dict] = {
    "a2.7b": {
        "title": "Qwen1.5-MoE-A2.7B (Qwen2MoeSparseMoeBlock)",
        "block": "qwen2_moe.Qwen2MoeSparseMoeBlock",
        "hf": "Qwen2MoeConfig",
        "hidden_size": 2048,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
    },
    "57b": {
        "title": "Qwen2-57B-A14B (Qwen2MoeSparseMoeBlock)",
        "block": "qwen2_moe.Qwen2MoeSparseMoeBlock",
        "hf": "Qwen2MoeConfig",
        "hidden_size": 3584,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2560,
        "shared_expert_intermediate_size": 20480,
        "norm_topk_prob": False,
    },
    "next80b": {
        "title": "Qwen3-Next-80B-A3B dims (Qwen2MoeSparseMoeBlock)",
        "block": "qwen2_moe.Qwen2MoeSparseMoeBlock",
        "hf": "Qwen2MoeConfig",
        "hidden_size": 2048,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
    },
    "next80b-q3next": {
        "title": "Qwen3-Next-80B-A3B (Qwen3NextSparseMoeBlock)",
        "block": "qwen3_next.Qwen3NextSparseMoeBlock",
        "hf": "Qwen3NextConfig",
        "hidden_size": 2048,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
    },
    "next80b-q3moe": {
        "title": "Qwen3-Next-80B-A3B dims (Qwen3MoeSparseMoeBlock + shared expert)",
        "block": "qwen3_moe.Qwen3MoeSparseMoeBlock",
        "hf": "Qwen3MoeConfig",
        "hidden_size": 2048,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
    },
    "30b-a3b": {
        "title": "Qwen3-30B-A3B, no shared expert (Qwen3MoeSparseMoeBlock; control)",
        "block": "qwen3_moe.Qwen3MoeSparseMoeBlock",
        "hf": "Qwen3MoeConfig",
        "hidden_size": 2048,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "shared_expert_intermediate_size": 0,
        "norm_topk_prob": True,
    },
}
DEFAULT_NS = (1, 2, 4, 8, 16, 64, 256, 1024)
#: The issue's bar: graph-replay speed-up at N=1 for these configs.
BAR_CONFIGS = ("a2.7b", "next80b")
BAR_SPEEDUP = 1.06
SEED = 20261125


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ==========================================================================
# worker (one per tree; imports that tree's vllm)
# ==========================================================================


class Worker:
    """Builds and times the blocks of one vLLM tree; commands come over a pipe."""

    def __init__(self, label: str, outdir: Path) -> None:
        import torch

        self.torch = torch
        self.label = label
        self.outdir = outdir
        self.blocks: dict[str, object] = {}
        self.prefixes: dict[str, str] = {}
        self.inputs: dict[tuple[str, int], object] = {}
        self.graphs: dict[tuple[str, int], tuple[object, object]] = {}
        self.pool = None
        self.vc = None
        # CPU smoke mode (CI/dev only): checks the plumbing (protocol, build,
        # weights, outputs, summary) without a GPU; the block's forward is
        # replaced by a stand-in because vLLM's CPU MoE needs compiled ops.
        self.smoke = os.environ.get("BENCH_LAYERS_SMOKE_CPU") == "1"
        self.dev = "cpu" if self.smoke else "cuda"

    # -- setup --------------------------------------------------------------
    def init_vllm(self) -> dict:
        import tempfile

        import vllm
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import (
            init_distributed_environment,
            initialize_model_parallel,
        )
        from vllm.v1.worker.workspace import init_workspace_manager

        torch = self.torch
        if not self.smoke:
            torch.cuda.set_device(0)
        self.vc = VllmConfig()
        self._ctx = set_current_vllm_config(self.vc)
        self._ctx.__enter__()
        fd, path = tempfile.mkstemp(prefix="bench_layers_dist_")
        os.close(fd)
        os.unlink(path)
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="gloo" if self.smoke else "nccl",
            distributed_init_method=f"file://{path}",
        )
        initialize_model_parallel(1, 1)
        init_workspace_manager(torch.device("cpu" if self.smoke else 0))
        return {"vllm_file": vllm.__file__, "vllm_version": vllm.__version__}

    def _hf_config(self, spec: dict):
        import transformers

        cls = getattr(transformers, spec["hf"])
        fields = {
            k: spec[k]
            for k in (
                "hidden_size",
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "norm_topk_prob",
            )
        }
        if self.smoke:  # tiny shapes: the CPU smoke run checks plumbing only
            fields["num_experts"] = min(fields["num_experts"], 16)
            fields["num_experts_per_tok"] = min(fields["num_experts_per_tok"], 4)
            for k in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                fields[k] = min(fields[k], 64)
        cfg = cls(hidden_act="silu", **fields)
        # Some config classes drop keys they do not declare (Qwen3MoeConfig
        # has no shared expert): set every field explicitly.
        for k, v in fields.items():
            setattr(cfg, k, v)
        return cfg

    def build(self, name: str, seed: int) -> dict:
        import importlib
        import types
        import zlib

        torch = self.torch
        spec = CONFIGS[name]
        mod_name, cls_name = spec["block"].rsplit(".", 1)
        mod = importlib.import_module(f"vllm.model_executor.models.{mod_name}")
        cls = getattr(mod, cls_name)
        hf = self._hf_config(spec)
        # A unique prefix per block: vLLM registers each MoE layer by name.
        prefix = f"model.layers.{len(self.prefixes)}.mlp"
        self.prefixes[name] = prefix
        t0 = time.time()
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(self.dev):
                if mod_name == "qwen2_moe":
                    block = cls(hf, quant_config=None, prefix=prefix)
                else:
                    # Qwen3 blocks read model_config.hf_text_config, parallel
                    # and quant config from the VllmConfig they are given.
                    shim = types.SimpleNamespace(
                        model_config=types.SimpleNamespace(hf_text_config=hf),
                        parallel_config=self.vc.parallel_config,
                        quant_config=None,
                    )
                    block = cls(shim, prefix=prefix)
        finally:
            torch.set_default_dtype(old)
        # Deterministic random weights: one generator per parameter name.
        params = dict(block.named_parameters())
        digest = hashlib.sha256()
        total = 0.0
        with torch.no_grad():
            for pname in sorted(params):
                p = params[pname]
                gen = torch.Generator(device=p.device)
                gen.manual_seed((seed * 1000003 + zlib.crc32(pname.encode())) % 2**62)
                p.normal_(0.0, float(p.shape[-1]) ** -0.5, generator=gen)
                s = float(p.double().sum())
                total += s
                digest.update(f"{pname}:{tuple(p.shape)}:{p.dtype}:{s:.6e};".encode())
        if self.smoke:
            block.forward = lambda x: x * 2.0  # stand-in, see __init__
        else:
            self._process_weights(block)
        block.eval()
        self.blocks[name] = block
        self._sync()
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "prefix": prefix,
            "params": {k: [list(v.shape), str(v.dtype)] for k, v in params.items()},
            "weights_sha256": digest.hexdigest(),
            "weights_sum": total,
            "build_s": round(time.time() - t0, 2),
        }

    def _process_weights(self, block) -> None:
        # What the model loader does (model_loader/utils.py,
        # process_weights_after_loading), for every module with a quant method.
        from vllm.model_executor.layers.quantization.base_config import (
            QuantizeMethodBase,
        )

        for _, module in block.named_modules():
            qm = getattr(module, "quant_method", None)
            if isinstance(qm, QuantizeMethodBase):
                qm.process_weights_after_loading(module)
                if hasattr(module, "update_param_tp_status"):
                    module.update_param_tp_status()

    def _input(self, name: str, n: int, seed: int):
        import zlib

        torch = self.torch
        key = (name, n)
        if key not in self.inputs:
            gen = torch.Generator(device=self.dev)
            gen.manual_seed((seed + 7919 * n + zlib.crc32(name.encode())) % 2**62)
            h = self.blocks[name].gate.weight.shape[-1]
            self.inputs[key] = torch.randn(
                n, h, generator=gen, device=self.dev, dtype=torch.bfloat16
            )
        return self.inputs[key]

    def _sync(self) -> None:
        if not self.smoke:
            self.torch.cuda.synchronize()

    def _fwd_ctx(self):
        from vllm.forward_context import set_forward_context

        return set_forward_context(None, self.vc)

    # -- per-config preparation ---------------------------------------------
    def prepare(
        self, name: str, ns: list[int], seed: int, capture_priority: int | None = None
    ) -> dict:
        """Warm up, save eager outputs, capture one CUDA graph per N.

        With ``capture_priority`` the graph is captured on a stream of that
        priority. PyTorch instantiates graphs with node priorities, so the
        block's main-stream kernels keep it on replay while the shared
        expert's aux stream keeps its own (vLLM creates it with the default, 0).
        """
        torch = self.torch
        block = self.blocks[name]
        info: dict = {}
        odir = self.outdir / name
        odir.mkdir(parents=True, exist_ok=True)
        if not self.smoke:
            # A fresh pool per config: capturing into a pool whose graphs were
            # all freed trips an allocator assert (torch 2.11).
            self.pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), self._fwd_ctx():
            # Largest N first: workspaces reach full size before any capture.
            for n in sorted(ns, reverse=True):
                x = self._input(name, n, seed)
                for _ in range(3):
                    y = block(x)
                self._sync()
                y = block(x).clone()
                y2 = block(x)
                self._sync()
                torch.save(y.cpu(), odir / f"{n}.pt")
                det = bool(torch.equal(y, y2))
                if self.smoke:
                    self.graphs[(name, n)] = (None, y)
                    info[n] = {
                        "finite": bool(torch.isfinite(y).all()),
                        "out_rms": float(y.float().pow(2).mean().sqrt()),
                        "eager_deterministic": det,
                        "graph_vs_eager_max_abs": 0.0,
                    }
                    continue
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        block(x)
                torch.cuda.current_stream().wait_stream(side)
                self._sync()
                g = torch.cuda.CUDAGraph()
                capture = (
                    None
                    if capture_priority is None
                    else torch.cuda.Stream(priority=capture_priority)
                )
                with torch.cuda.graph(g, pool=self.pool, stream=capture):
                    gy = block(x)
                g.replay()
                self._sync()
                gdiff = float((gy.float() - y.float()).abs().max())
                self.graphs[(name, n)] = (g, gy)
                info[n] = {
                    "finite": bool(torch.isfinite(y).all()),
                    "out_rms": float(y.float().pow(2).mean().sqrt()),
                    "eager_deterministic": det,
                    "graph_vs_eager_max_abs": gdiff,
                }
        return info

    def release(self, name: str) -> dict:
        torch = self.torch
        for key in [k for k in self.graphs if k[0] == name]:
            del self.graphs[key]
        for key in [k for k in self.inputs if k[0] == name]:
            del self.inputs[key]
        self.blocks.pop(name, None)
        # The forward context's layer registry holds the block too.
        ctx = self.vc.compilation_config.static_forward_context
        for key in [k for k in ctx if k.startswith(self.prefixes[name] + ".")]:
            del ctx[key]
        self._sync()
        if self.smoke:
            return {}
        torch.cuda.empty_cache()
        return {"mem_allocated": torch.cuda.memory_allocated()}

    # -- timing ---------------------------------------------------------------
    def _loop(self, fn, iters: int, reps: int, warm_ms: float = 20.0) -> list[float]:
        torch = self.torch
        # Warm up for >= warm_ms (and >= 3 calls): clocks, caches, allocator.
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or (time.perf_counter() - t0) * 1e3 < warm_ms:
            fn()
            calls += 1
            if calls % 8 == 0:
                self._sync()
        self._sync()
        out = []
        if self.smoke:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                out.append((time.perf_counter() - t0) * 1e6 / iters)
            return out
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1000.0 / iters)
        return out

    def _flush_buffer(self, flush_mb: int):
        """The buffer zeroed before a cold-L2 call (``flush_mb`` MiB), kept across calls."""
        size = flush_mb << 20
        if getattr(self, "_flush", None) is None or self._flush.numel() != size:
            self._flush = self.torch.empty(size, dtype=self.torch.int8, device="cuda")
        return self._flush

    def _percall(self, fn, calls: int, flush_mb: int, warm_ms: float = 20.0):
        """Per-call CUDA-event times, L2 flushed before every call (cold L2).

        As ``triton.testing.do_bench`` does: a ``flush_mb`` buffer is zeroed
        before each call, outside the timed events, so every forward reads its
        weights from HBM as it does in a model whose other layers evict them.
        """
        torch = self.torch
        self._flush_buffer(flush_mb)
        t0 = time.perf_counter()
        k = 0
        while k < 3 or (time.perf_counter() - t0) * 1e3 < warm_ms:
            self._flush.zero_()
            fn()
            k += 1
            if k % 8 == 0:
                self._sync()
        self._sync()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        for i in range(calls):
            self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        self._sync()
        return [a.elapsed_time(b) * 1000.0 for a, b in zip(starts, ends, strict=False)]

    def _forwards(self, name: str, n: int, seed: int):
        """(eager forward, graph replay, whether a graph was captured) of one block and N;
        without a captured graph (CPU smoke) the replay is the eager forward."""
        block = self.blocks[name]
        x = self._input(name, n, seed)
        g, _ = self.graphs[(name, n)]
        eager = lambda: block(x)  # noqa: E731
        return eager, (g.replay if g is not None else eager), g is not None

    def time(
        self,
        name: str,
        n: int,
        seed: int,
        iters: dict,
        reps: int,
        flush_mb: int = 0,
        calls: dict | None = None,
    ) -> dict:
        """Time eager and graph.

        With ``flush_mb`` (and not in smoke mode): ``calls[mode]`` single calls,
        each after an L2 flush, median per call. Else hot L2: ``reps`` loops of
        ``iters[mode]`` back-to-back calls (0: calibrate to ~3 ms loops).
        """
        torch = self.torch
        eager, replay, _ = self._forwards(name, n, seed)
        res: dict = {}
        with torch.inference_mode(), self._fwd_ctx():
            for mode, fn in (("eager", eager), ("graph", replay)):
                if flush_mb and not self.smoke:
                    t = sorted(self._percall(fn, calls[mode], flush_mb))
                    q = [t[int(f * (len(t) - 1))] for f in (0.1, 0.25, 0.75, 0.9)]
                    res[mode] = {
                        "us": statistics.median(t),
                        "p10_p25_p75_p90": [round(v, 3) for v in q],
                        "calls": len(t),
                        "iters": 1,
                    }
                    continue
                it = iters.get(mode) or 0
                if not it:
                    t = statistics.median(self._loop(fn, 5, 3))
                    it = max(10, min(500, int(3000.0 / max(t, 1e-3))))
                times = self._loop(fn, it, reps)
                res[mode] = {"us": statistics.median(times), "reps": times, "iters": it}
        return res

    # -- profile --------------------------------------------------------------
    def profile(
        self, name: str, n: int, seed: int, cold_replays: int = 0, flush_mb: int = 0
    ) -> dict:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch = self.torch
        eager, replay, captured = self._forwards(name, n, seed)
        result: dict = {}
        with torch.inference_mode(), self._fwd_ctx():
            for mode, fn in (("eager", eager), ("graph", replay)):
                for _ in range(3):
                    fn()
                self._sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    self._sync()
                kernels, stream_note = self._device_events(prof, DeviceType)
                names = [k["name"] for k in kernels]
                result[mode] = {
                    "events": kernels,
                    "n_events": len(kernels),
                    "n_dtod": sum("DtoD" in s for s in names),
                    "n_memcpy": sum(s.startswith("Memcpy") for s in names),
                    "n_memset": sum(s.startswith("Memset") for s in names),
                    "device_us_sum": round(sum(k["us"] for k in kernels), 3),
                    # First start to last end on the device, and per stream
                    # (the shared expert may run on an aux stream, overlapped).
                    "span_us": self._span(kernels),
                    "streams": self._streams(kernels),
                    "stream_note": stream_note,
                }
            if cold_replays and captured:
                result["cold_replays"] = self._profile_cold_replays(
                    replay, cold_replays, flush_mb, profile, ProfilerActivity, DeviceType
                )
        return result

    def _profile_cold_replays(self, replay, count, flush_mb, profile, activities, device_type):
        """Per-stream timelines of ``count`` graph replays, each on a cold L2.

        Queued as the timing queues them (flush, replay, flush, replay, ...,
        no host sync in between) in one profiler session, then cut at the
        flush kernels, which run on the launch stream before each replay.
        One profiled replay cannot show which stream's timeline moves from
        one replay to the next; these can (``ci/plot_layers.py --race``).
        """
        self._flush_buffer(flush_mb or 256)
        self._sync()
        with profile(activities=[activities.CPU, activities.CUDA]) as prof:
            for _ in range(count):
                self._flush.zero_()
                replay()
            self._sync()
        kernels, _ = self._device_events(prof, device_type)
        # The flush is the only int8 fill: the graph's own kernels share its
        # stream, so the stream alone does not tell them apart.
        flushes = [
            i for i, k in enumerate(kernels) if "FillFunctor<" in k["name"] and "char>" in k["name"]
        ]
        if len(flushes) != count:
            return {"count": count, "error": f"found {len(flushes)} flush kernels"}
        replays = []
        for j, i in enumerate(flushes):
            stop = flushes[j + 1] if j + 1 < len(flushes) else len(kernels)
            flush_end = kernels[i]["start_us"] + kernels[i]["us"]
            ks = [
                dict(k, start_us=round(k["start_us"] - flush_end, 3)) for k in kernels[i + 1 : stop]
            ]
            replays.append(
                {
                    "span_us": self._span(ks),
                    "streams": self._streams(ks),
                    "kernels": [[k["name"][:60], k["stream"], k["start_us"], k["us"]] for k in ks],
                }
            )
        spans = sorted(r["span_us"] for r in replays)
        return {
            "count": count,
            "span_from": "the end of the flush kernel before the replay",
            "span_us": {"min": spans[0], "median": statistics.median(spans), "max": spans[-1]},
            "replays": replays,
        }

    @staticmethod
    def _device_events(prof, device_type) -> tuple[list[dict], str]:
        """Device events (kernels, copies) in start order, times in us."""
        kernels: list[dict] = []
        note = "kineto events (stream = CUDA stream id)"
        try:
            for k in prof.profiler.kineto_results.events():
                if k.device_type() != device_type.CUDA or k.name().startswith("["):
                    continue  # host events; "[memory]" allocator records
                kernels.append(
                    {
                        "name": k.name(),
                        "us": k.duration_ns() / 1e3,
                        "start_us": k.start_ns() / 1e3,
                        "stream": int(k.device_resource_id()),
                    }
                )
        except Exception as e:  # fall back to the FunctionEvent view
            note = f"FunctionEvents, no stream ids ({type(e).__name__}: {e})"
            kernels = []
            for ev in prof.events():
                if ev.device_type != device_type.CUDA:
                    continue
                dt = getattr(ev, "device_time", None)
                if dt is None:
                    dt = getattr(ev, "cuda_time", 0.0)
                kernels.append(
                    {
                        "name": ev.name,
                        "us": float(dt),
                        "start_us": float(ev.time_range.start),
                        "stream": None,
                    }
                )
        kernels.sort(key=lambda k: k["start_us"])
        t0 = kernels[0]["start_us"] if kernels else 0.0
        for k in kernels:
            k["start_us"] = round(k["start_us"] - t0, 3)
            k["us"] = round(k["us"], 3)
        return kernels, note

    @staticmethod
    def _span(kernels: list[dict]) -> float:
        """First start to last end on the device, in us."""
        return round(max((k["start_us"] + k["us"] for k in kernels), default=0.0), 3)

    @staticmethod
    def _streams(kernels: list[dict]) -> dict:
        out: dict = {}
        for k in kernels:
            st = out.setdefault(
                str(k["stream"]), {"n": 0, "busy_us": 0.0, "first_us": k["start_us"]}
            )
            st["n"] += 1
            st["busy_us"] = round(st["busy_us"] + k["us"], 3)
            st["last_end_us"] = round(k["start_us"] + k["us"], 3)
        return out


def worker_main(args: argparse.Namespace) -> int:
    cmd_in = os.fdopen(args.cmd_fd, "r")
    res_out = os.fdopen(args.res_fd, "w")

    def reply(obj: dict) -> None:
        res_out.write(json.dumps(obj) + "\n")
        res_out.flush()

    try:
        w = Worker(args.label, Path(args.outdir))
        info = w.init_vllm()
        reply({"ok": True, "result": info})
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        return 1
    for line in cmd_in:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            reply({"ok": True, "result": None})
            break
        try:
            result = getattr(w, op)(**msg)
            reply({"ok": True, "result": result})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


# ==========================================================================
# parent
# ==========================================================================


class WorkerProc:
    """A worker subprocess with its tree first on PYTHONPATH."""

    def __init__(self, label: str, tree: Path, site: Path | None, work: Path):
        self.label = label
        self.log_path = work / f"worker-{label}.log"
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        path = [str(tree)] + ([str(site)] if site else [])
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # Device rule: NVLink multicast stays off in every process.
        env.update(
            NCCL_NVLS_ENABLE="0",
            TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
            NVSHMEM_DISABLE_NVLS="1",
        )
        outdir = work / "outputs" / label
        outdir.mkdir(parents=True, exist_ok=True)
        self.outdir = outdir
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "worker",
                "--label",
                label,
                "--outdir",
                str(outdir),
                "--cmd-fd",
                str(cmd_r),
                "--res-fd",
                str(res_w),
            ],
            env=env,
            cwd=str(work),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(cmd_r, res_w),
        )
        os.close(cmd_r)
        os.close(res_w)
        self.cmd = os.fdopen(cmd_w, "w")
        self.res = os.fdopen(res_r, "r")

    def send(self, op: str, **kw) -> None:
        self.cmd.write(json.dumps({"op": op, **kw}) + "\n")
        self.cmd.flush()

    def recv(self):
        line = self.res.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died; log tail:\n{self.tail()}")
        msg = json.loads(line)
        if not msg["ok"]:
            raise RuntimeError(f"worker {self.label}: {msg['error']}")
        return msg["result"]

    def call(self, op: str, **kw):
        self.send(op, **kw)
        return self.recv()

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


def tree_digest(tree: Path) -> dict:
    """sha256 over (path, sha256) of every file under the tree's ``vllm/``
    except compiled modules and caches (the Python and Triton sources)."""
    root = tree / "vllm"
    h = hashlib.sha256()
    count = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix == ".so":
            continue
        if p.name == "_vllm_fa3_C.py" and p.stat().st_size == 0:
            continue  # the import stub unpack_bundle adds
        rel = p.relative_to(tree).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        count += 1
    return {"vllm_sources_sha256": h.hexdigest(), "files": count}


def unpack_bundle(bundle: Path, work: Path) -> tuple[Path, Path, Path, dict]:
    """Unpack a ``ci/device_bundle.py`` bundle: base tree, patched overlay,
    compiled modules into both trees, dependency wheels into ``work/site``."""
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    base, patched, site = work / "base", work / "patched", work / "site"
    for d in (base, patched, site):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    with tarfile.open(bundle / "trees" / "base.tar.xz") as tf:
        tf.extractall(base, filter="data")
    shutil.copytree(base, patched, dirs_exist_ok=True)
    with tarfile.open(bundle / "trees" / "patched.tar.xz") as tf:
        tf.extractall(patched, filter="data")
    deleted = bundle / "trees" / "patched.deleted"
    if deleted.exists():
        for rel in deleted.read_text().split():
            (patched / rel).unlink(missing_ok=True)
    for xz in sorted((bundle / "so").rglob("*.so.xz")):
        rel = xz.relative_to(bundle / "so").with_suffix("")
        data = lzma.decompress(xz.read_bytes())
        for tree in (base, patched):
            (tree / rel).write_bytes(data)
            (tree / rel).chmod(0o755)
    for info in (bundle / "so").glob("*.dist-info"):
        for tree in (base, patched):
            shutil.copytree(info, tree / info.name, dirs_exist_ok=True)
    # vllm_flash_attn's compiled module is not carried; an empty stub lets the
    # package import (nothing here uses it).
    for tree in (base, patched):
        stub = tree / "vllm" / "vllm_flash_attn" / "_vllm_fa3_C.py"
        if stub.parent.is_dir() and not any(stub.parent.glob("_vllm_fa3_C*")):
            stub.write_text("")
    wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(site),
                *wheels,
            ],
            check=True,
        )
    return base, patched, site, manifest


def compare_outputs(a: Path, b: Path) -> dict:
    import torch

    x = torch.load(a).float()
    y = torch.load(b).float()
    if x.shape != y.shape:
        return {"ok": False, "why": f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"}
    d = (x - y).abs()
    ref = y.abs().max().item() or 1.0
    rel_l2 = ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
    # bf16 has 8 significant bits: one rounding is <= 2^-8 relative; allow a
    # few roundings on the gate path (sigmoid * shared, then the add).
    ok = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
    ok = ok and rel_l2 <= 1e-2 and d.max().item() <= 2**-5 * ref
    return {
        "ok": ok,
        "identical": bool(torch.equal(x, y)),
        "max_abs": d.max().item(),
        "max_ref": ref,
        "rel_l2": rel_l2,
        "frac_differ": (d > 0).float().mean().item(),
    }


def _versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        out["triton"] = f"unavailable: {e}"
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception as e:  # pragma: no cover
        out["transformers"] = f"unavailable: {e}"
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = p.name
        out["sms"] = p.multi_processor_count
    with contextlib.suppress(Exception):
        out["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    return out


def summarize_rows(rows: list[dict], floor_pct: float = 0.0) -> None:
    """Fill medians, ratios and spread per row (in place).

    ``spread_pct`` = max(noise_pct, |aa_ratio - 1|, ``floor_pct``).
    """
    for row in rows:
        for mode in ("eager", "graph"):
            b = [r["base"][mode]["us"] for r in row["rounds"]]
            p = [r["patched"][mode]["us"] for r in row["rounds"]]
            if not b:
                continue
            bm, pm = statistics.median(b), statistics.median(p)
            ratios = [x / y for x, y in zip(b, p, strict=False)]
            noise = max(abs(x / bm - 1) for x in b) * 100
            pnoise = max(abs(x / pm - 1) for x in p) * 100
            # Further trees (--also), each as base / that tree's median.
            also = {
                label: [r[label][mode]["us"] for r in row["rounds"]]
                for label in row["rounds"][0]
                if label not in ("base", "patched", "order")
            }
            also_median = {label: statistics.median(t) for label, t in also.items()}
            spread = max(noise, floor_pct)
            aa = None
            if "base2" in also:
                # Base vs a second base process: the process-to-process part of
                # the spread, which rounds within one process cannot see.
                aa = bm / also_median["base2"]
                spread = max(spread, abs(aa - 1) * 100)
            row[mode] = {
                "base_us": round(bm, 3),
                "patched_us": round(pm, 3),
                "speedup": round(bm / pm, 4),
                "ratio_min": round(min(ratios), 4),
                "ratio_max": round(max(ratios), 4),
                "noise_pct": round(noise, 2),
                "patched_noise_pct": round(pnoise, 2),
                "aa_ratio": None if aa is None else round(aa, 4),
                "spread_pct": round(spread, 2),
                "slower_beyond_spread": (pm / bm - 1) * 100 > spread,
                "base_rounds_us": [round(x, 3) for x in b],
                "patched_rounds_us": [round(x, 3) for x in p],
            }
            if also:
                row[mode]["also"] = {
                    label: {
                        "us": round(also_median[label], 3),
                        "speedup": round(bm / also_median[label], 4),
                        "rounds_us": [round(x, 3) for x in t],
                    }
                    for label, t in also.items()
                }


def verdict(result: dict) -> dict:
    rows = result["rows"]
    out: dict = {
        "bar_speedup_graph_n1": {},
        "slower_beyond_spread": [],
        "outputs_ok": True,
    }
    for row in rows:
        if row["config"] in BAR_CONFIGS and row["n"] == 1 and "graph" in row:
            out["bar_speedup_graph_n1"][row["config"]] = row["graph"]["speedup"]
        for mode in ("eager", "graph"):
            if row.get(mode, {}).get("slower_beyond_spread"):
                out["slower_beyond_spread"].append(
                    f"{row['config']} N={row['n']} {mode}: "
                    f"{row[mode]['speedup']:.3f}x (spread {row[mode]['spread_pct']}%)"
                )
        if not row.get("outputs", {}).get("ok", False):
            out["outputs_ok"] = False
    sp = out["bar_speedup_graph_n1"]
    out["bar_met"] = (
        all(sp.get(c, 0) >= BAR_SPEEDUP for c in BAR_CONFIGS)
        and not [s for s in out["slower_beyond_spread"] if " graph:" in s]
        and out["outputs_ok"]
    )
    return out


def run_main(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or "layers-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    manifest: dict = {}
    site = Path(args.site).resolve() if args.site else None
    if args.bundle:
        _log(f"unpacking {args.bundle} into {work}")
        base, patched, site, manifest = unpack_bundle(Path(args.bundle), work)
    else:
        if not (args.base and args.patched):
            raise SystemExit("give --bundle, or --base and --patched")
        base, patched = Path(args.base).resolve(), Path(args.patched).resolve()
    trees = {"base": base, "patched": patched}
    revs = {
        "base": args.base_rev or manifest.get("trees", {}).get("base_rev"),
        "patched": args.patched_rev or manifest.get("trees", {}).get("head_rev"),
    }
    for spec in (["base2=base"] if args.aa else []) + (args.also or []):
        label, _, tree = spec.partition("=")
        if not tree or label in trees or label == "order":
            raise SystemExit(f"--also {spec}: want a new LABEL=TREE")
        # "base" / "patched" name the trees above (a second process of the same tree).
        trees[label] = trees.get(tree) or Path(tree).resolve()
        revs[label] = revs.get(tree)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    ns = [int(v) for v in args.ns.split(",")] if args.ns else list(DEFAULT_NS)
    result: dict = {
        "what": "vLLM Qwen sparse-MoE block forward, base vs patched tree (issue 9)",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "trees": {k: {"path": str(v), "rev": revs[k], **tree_digest(v)} for k, v in trees.items()},
        "patched_changed": manifest.get("trees", {}).get("patched_changed"),
        "settings": {
            "rounds": args.rounds,
            "reps": args.reps,
            "seed": args.seed,
            "ns": ns,
            "configs": configs,
            "dtype": "bfloat16",
            "order": "per (config, N): base/patched alternated, order flipped "
            "every round and every N (ABBA)",
            "timing": (
                f"cold L2: median of single calls, each timed by CUDA events "
                f"after zeroing a {args.flush_mb} MiB buffer (calls per round: "
                f"graph {args.calls_graph}, eager {args.calls_eager})"
                if args.flush_mb
                else "hot L2: median of `reps` CUDA-event loops of `iters` "
                "back-to-back calls (iters calibrated to ~3 ms by the first "
                "worker timed, reused by the others)"
            )
            + "; eager = block(x) inside set_forward_context; graph = replay "
            "of one captured forward",
            "flush_mb": args.flush_mb,
            "capture_priority": args.capture_priority,
            "calls_graph": args.calls_graph,
            "calls_eager": args.calls_eager,
            "spread": "noise_pct = max over rounds |base_round/base_median - 1| "
            "(base vs base within one process); aa_ratio = base/base2 medians "
            "(two processes of the same base tree, with --aa); spread_pct = "
            "max(noise_pct, |aa_ratio - 1|, spread_floor); ratio_min/max = "
            "per-round base/patched",
            "spread_floor": args.spread_floor,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "CUDA_"))},
        },
        "configs": {c: CONFIGS[c] for c in configs},
        "build": {},
        "prepare": {},
        "profiles": {},
        "rows": [],
        "partial": True,
    }
    if (
        result["trees"]["base"]["vllm_sources_sha256"]
        == result["trees"]["patched"]["vllm_sources_sha256"]
    ):
        _log("NOTE: base and patched vllm/ sources are identical (A/A run)")
        result["a_a_run"] = True

    def save() -> None:
        (out / "layers.json").write_text(json.dumps(result, indent=1) + "\n")

    save()
    workers: dict[str, WorkerProc] = {}
    try:
        for label, tree in trees.items():
            workers[label] = WorkerProc(label, tree, site, work)
        for label, w in workers.items():
            info = w.recv()
            result["trees"][label].update(info)
            _log(f"{label}: vllm from {info['vllm_file']}")
        for ci, name in enumerate(configs):
            t0 = time.time()
            # Build + warm up + capture in both workers at once (CPU/JIT bound).
            for w in workers.values():
                w.send("build", name=name, seed=args.seed)
            built = {k: w.recv() for k, w in workers.items()}
            result["build"][name] = built
            if len({b["weights_sha256"] for b in built.values()}) != 1:
                raise RuntimeError(f"{name}: the workers' weights differ: {built}")
            for w in workers.values():
                w.send(
                    "prepare",
                    name=name,
                    ns=ns,
                    seed=args.seed,
                    capture_priority=args.capture_priority,
                )
            prep = {k: w.recv() for k, w in workers.items()}
            result["prepare"][name] = prep
            _log(f"{name}: built and captured in {time.time() - t0:.1f} s")
            rows = {n: {"config": name, "n": n, "rounds": []} for n in ns}
            perms = [list(p) for p in itertools.permutations(workers)]
            iters: dict[int, dict] = {n: {} for n in ns}
            # Round -1 is a discarded warm-up pass (the first timings of a
            # process run slow); rounds 0.. are recorded.
            for r in range(-1, args.rounds):
                for j, n in enumerate(ns):
                    # Every order in turn (ABBA for two workers), shifted by N.
                    order = perms[(r + j) % len(perms)]
                    got = {}
                    for label in order:
                        got[label] = workers[label].call(
                            "time",
                            name=name,
                            n=n,
                            seed=args.seed,
                            iters=iters[n],
                            reps=args.reps if r >= 0 else 1,
                            flush_mb=args.flush_mb,
                            calls={
                                "eager": args.calls_eager if r >= 0 else 3,
                                "graph": args.calls_graph if r >= 0 else 5,
                            },
                        )
                        if not iters[n]:
                            iters[n] = {m: got[label][m]["iters"] for m in got[label]}
                    got["order"] = order
                    if r >= 0:
                        rows[n]["rounds"].append(got)
            for n in ns:
                rows[n]["outputs"] = compare_outputs(
                    workers["base"].outdir / name / f"{n}.pt",
                    workers["patched"].outdir / name / f"{n}.pt",
                )
                for label in workers:
                    if label not in ("base", "patched"):
                        rows[n]["outputs"][label] = compare_outputs(
                            workers["base"].outdir / name / f"{n}.pt",
                            workers[label].outdir / name / f"{n}.pt",
                        )
                for label in workers:
                    p = prep[label][str(n)] if str(n) in prep[label] else prep[label][n]
                    rows[n]["outputs"][f"{label}_graph_vs_eager_max_abs"] = p[
                        "graph_vs_eager_max_abs"
                    ]
            summarize_rows(list(rows.values()), args.spread_floor)
            result["rows"].extend(rows.values())
            if not args.no_profile and 1 in ns:
                prof = result["profiles"][name] = {}
                for label in workers:
                    try:
                        prof[label] = workers[label].call(
                            "profile",
                            name=name,
                            n=1,
                            seed=args.seed,
                            cold_replays=args.cold_replays,
                            flush_mb=args.flush_mb,
                        )
                    except RuntimeError as e:  # keep the timings if it fails
                        prof[label] = {"error": str(e)[-2000:]}
            for w in workers.values():
                w.call("release", name=name)
            result["elapsed_s"] = round(time.time() - t_start, 1)
            save()
            _log(f"{name}: done in {time.time() - t0:.1f} s ({ci + 1}/{len(configs)})")
            print(format_rows(list(rows.values())), flush=True)
        result["partial"] = False
    except Exception:
        result["error"] = traceback.format_exc()
        for label, w in workers.items():
            result.setdefault("worker_log_tail", {})[label] = w.tail()
        _log("FAILED:\n" + result["error"])
        for label, w in workers.items():
            print(f"--- worker {label} log tail ---\n{w.tail(3000)}", flush=True)
    finally:
        for w in workers.values():
            w.close()
        # Worker logs (vLLM's warnings) come back only when something failed:
        # the device returns at most 8 files.
        if "error" in result or args.keep_logs:
            for label, w in workers.items():
                if w.log_path.exists():
                    shutil.copyfile(w.log_path, out / f"worker-{label}.log")
        result["verdict"] = verdict(result)
        result["elapsed_s"] = round(time.time() - t_start, 1)
        save()
    print(format_rows(result["rows"]), flush=True)
    print(json.dumps(result["verdict"], indent=1), flush=True)
    for name, prof in result["profiles"].items():
        for label, p in prof.items():
            e = p.get("eager", {})
            print(
                f"profile {name} {label} N=1 eager: {e.get('n_events')} device events, "
                f"{e.get('n_dtod')} DtoD, sum {e.get('device_us_sum')} us",
                flush=True,
            )
            cold = p.get("cold_replays")
            if cold and cold.get("replays"):
                ends = {
                    sid: statistics.median(
                        r["streams"][sid]["last_end_us"]
                        for r in cold["replays"]
                        if sid in r["streams"]
                    )
                    for sid in cold["replays"][0]["streams"]
                }
                print(
                    f"  {cold['count']} cold replays: span {cold['span_us']}; median last end "
                    f"per stream: {ends}",
                    flush=True,
                )
    return 0 if "error" not in result else 1


def format_rows(rows: list[dict]) -> str:
    lines = [
        (
            f"{'config':<16}{'N':>6} | {'eager base':>10} {'patched':>9} {'x':>6} "
            f"{'sprd%':>6} | {'graph base':>10} {'patched':>9} {'x':>6} "
            f"{'min':>6} {'max':>6} {'sprd%':>6} | out"
        )
    ]
    for r in rows:
        e, g = r.get("eager"), r.get("graph")
        if not e or not g:
            continue
        o = r.get("outputs", {})
        lines.append(
            f"{r['config']:<16}{r['n']:>6} | {e['base_us']:>10.1f} "
            f"{e['patched_us']:>9.1f} {e['speedup']:>6.3f} {e['spread_pct']:>6.2f} | "
            f"{g['base_us']:>10.1f} "
            f"{g['patched_us']:>9.1f} {g['speedup']:>6.3f} {g['ratio_min']:>6.3f} "
            f"{g['ratio_max']:>6.3f} {g['spread_pct']:>6.2f} | "
            f"{'ok' if o.get('ok') else 'BAD'} {o.get('rel_l2', float('nan')):.1e}"
        )
        for label, a in g.get("also", {}).items():
            lines.append(
                f"{'':<16}{'':>6}   graph base/{label}: {a['speedup']:.3f} "
                f"({a['us']:.1f} us; rounds {a['rounds_us']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="parent: A/B both trees (on the GPU device)")
    r.add_argument("--bundle", help="ci/device_bundle.py bundle folder to unpack")
    r.add_argument("--base", help="base tree root (holds vllm/)")
    r.add_argument("--patched", help="patched tree root (holds vllm/)")
    r.add_argument("--site", help="extra site dir with vLLM's dependencies")
    r.add_argument("--base-rev", help="base tree's git revision (for the record)")
    r.add_argument("--patched-rev", help="patched tree's git revision")
    r.add_argument("--work", default="/tmp/bench_layers", help="scratch folder")
    r.add_argument("--out", help="result folder (default $OUT)")
    r.add_argument("--configs", help=f"comma list of {','.join(CONFIGS)}")
    r.add_argument("--ns", help="comma list of token counts")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--seed", type=int, default=SEED)
    r.add_argument("--no-profile", action="store_true")
    r.add_argument(
        "--cold-replays",
        type=int,
        default=0,
        help="also profile this many N=1 graph replays one by one, each on a cold L2 "
        "(per-stream timelines, to see which stream moves between runs)",
    )
    r.add_argument(
        "--capture-priority",
        type=int,
        help="capture the graphs on a stream of this CUDA priority (e.g. -1: the "
        "block's main stream above the shared experts' aux stream); default: "
        "torch.cuda.graph's own capture stream, priority 0 like vLLM's",
    )
    r.add_argument("--keep-logs", action="store_true", help="copy worker logs to --out")
    r.add_argument(
        "--flush-mb",
        type=int,
        default=256,
        help="L2 flush buffer zeroed before every timed call (0: hot-L2 loops)",
    )
    r.add_argument("--calls-graph", type=int, default=100, help="timed replays")
    r.add_argument(
        "--spread-floor",
        type=float,
        default=1.0,
        help="least spread in %% (A/A run, 2026-11-25, H100, cold L2: "
        "|base/base' - 1| <= 0.7%% under graphs but for 57b N=1024)",
    )
    r.add_argument("--calls-eager", type=int, default=30, help="timed eager calls")
    r.add_argument(
        "--aa",
        action="store_true",
        help="also time a second base worker (base vs base across processes); "
        "its ratio joins the spread (same as --also base2=base)",
    )
    r.add_argument(
        "--also",
        action="append",
        metavar="LABEL=TREE",
        help="also time this tree (a path, or base / patched for a second process of "
        "that tree) in the same rotation, reported as base / LABEL; repeatable",
    )
    m = sub.add_parser("summarize", help="recompute medians/spread/verdict of a layers.json (here)")
    m.add_argument("json")
    m.add_argument("--spread-floor", type=float, default=1.0)
    w = sub.add_parser("worker", help="internal: one tree's worker")
    w.add_argument("--label", required=True)
    w.add_argument("--outdir", required=True)
    w.add_argument("--cmd-fd", type=int, required=True)
    w.add_argument("--res-fd", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return worker_main(args)
    if args.cmd == "summarize":
        path = Path(args.json)
        res = json.loads(path.read_text())
        summarize_rows(res["rows"], args.spread_floor)
        res["settings"]["spread_floor"] = args.spread_floor
        res["verdict"] = verdict(res)
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(format_rows(res["rows"]))
        print(json.dumps(res["verdict"], indent=1))
        return 0
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
