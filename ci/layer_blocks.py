"""vLLM's Qwen sparse-MoE blocks built outside the engine, for ``ci/bench_layers.py``.

``CONFIGS`` holds the published model dimensions. ``LayerBlocks`` (in a
worker process, one per vLLM tree) sets vLLM up the way the engine would for
one rank, builds each block with deterministic random bf16 weights, makes
its inputs, warms it up, saves its eager outputs and captures one CUDA graph
per N. Timing and profiling build on it (``layer_timing``, ``layer_profile``).
"""

from __future__ import annotations

import hashlib
import os
import time
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


class LayerBlocks:
    """The blocks of one vLLM tree (imported from that tree), their inputs and graphs."""

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
