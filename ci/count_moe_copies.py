#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Count device-to-device copies in one modular MoE forward (issue 4).

Builds vLLM's real modular MoE kernel (FusedMoEKernel with
MoEPrepareAndFinalizeNoDPEPModular and TritonExperts, unquantized bf16) from
the vLLM tree on PYTHONPATH, runs one forward under torch.profiler and counts
the copies that move data between device buffers:

- ``aten_copy``: ``aten::copy_`` ops called directly (not inside another
  aten op),
- ``memcpy_dtod``: device-side ``Memcpy DtoD`` events (CUDA only),
- ``copy_kernels``: device kernels whose name contains ``copy`` (CUDA only;
  copies that cast or restride run as kernels instead of memcpys).

Each shape runs in two decision modes:

- ``native``: the real platform;
- ``rocm_no_aiter``: the modular kernel's platform checks answer "ROCm" and
  AITER fused MoE is disabled. Only the modular kernel module sees the patched
  platform (its ``current_platform`` is replaced by a proxy that answers
  is_rocm() True and is_cuda() False and delegates everything else, is_cpu()
  included, so buffers are allocated as on the real device).

The script runs on the pristine tree (no ``accepts_output_alias`` hook) and on
the patched tree, so one device call gives before/after counts. Prints a table
and writes JSON to ``--out``.

``--device cpu`` is a smoke test without a GPU: TritonExperts needs the
compiled MoE ops, so a small plain-torch experts class (no copies of its own)
stands in for it and takes TritonExperts' alias choice; only ``aten_copy`` is
counted.

Usage::

    PYTHONPATH=/path/to/vllm python ci/count_moe_copies.py --out copies.json
    VLLM_TARGET_DEVICE=cpu PYTHONPATH=/path/to/vllm \\
        python ci/count_moe_copies.py --device cpu --out copies_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch

MODES = ("native", "rocm_no_aiter")


class _PlatformProxy:
    """Delegates to the real platform, but claims to be ROCm."""

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def is_rocm(self) -> bool:
        return True

    def is_cuda(self) -> bool:
        return False


@contextlib.contextmanager
def decision_mode(mode: str) -> Iterator[None]:
    """Switch the platform the modular kernel decides on."""
    if mode == "native":
        yield
        return
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm._aiter_ops import rocm_aiter_ops

    saved_platform = mk.current_platform
    saved_enabled = rocm_aiter_ops.__dict__["is_fused_moe_enabled"]
    mk.current_platform = _PlatformProxy(saved_platform)
    rocm_aiter_ops.is_fused_moe_enabled = classmethod(lambda cls: False)
    try:
        yield
    finally:
        mk.current_platform = saved_platform
        rocm_aiter_ops.is_fused_moe_enabled = saved_enabled


def make_moe_config(E: int, topk: int, K: int, N: int, dtype, device: str):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=E,
        experts_per_token=topk,
        hidden_dim=K,
        intermediate_size=N,
        num_local_experts=E,
        num_logical_experts=E,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        activation=MoEActivation.SILU,
        in_dtype=dtype,
        device=device,
        routing_method=RoutingMethodType.TopK,
        max_num_tokens=512,
    )


def make_cpu_standin_experts_cls():
    """Plain-torch experts with TritonExperts' layout, finalize and alias
    choice (CPU smoke test only)."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import (
        TritonExperts,
    )
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceNoOP,
    )

    class CpuStandInExperts(mk.FusedMoEExpertsModular):
        def accepts_output_alias(self) -> bool:
            hook = getattr(TritonExperts, "accepts_output_alias", None)
            return True if hook is None else hook(self)

        @staticmethod
        def activation_format():
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device() -> bool:
            return True

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return True

        @staticmethod
        def _supports_activation(activation) -> bool:
            return True

        @staticmethod
        def _supports_parallel_config(moe_parallel_config) -> bool:
            return True

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceNoOP()

        def workspace_shapes(self, M, N, K, topk, *args):
            return TritonExperts.workspace_shapes(self, M, N, K, topk, *args)

        def apply(
            self,
            output,
            hidden_states,
            w1,
            w2,
            topk_weights,
            topk_ids,
            activation,
            *args,
            **kwargs,
        ):
            M, K = hidden_states.shape
            topk = topk_ids.size(1)
            workspace2 = kwargs.get("workspace2", args[6] if len(args) > 6 else None)
            rows = workspace2.flatten()[: M * topk * K].view(M, topk, K)
            for j in range(topk):
                e = topk_ids[:, j].long()
                h = torch.einsum("mk,mnk->mn", hidden_states, w1[e])
                n = h.size(-1) // 2
                a = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
                y = torch.einsum("mn,mkn->mk", a, w2[e])
                torch.mul(y, topk_weights[:, j : j + 1], out=rows[:, j])
            torch.sum(rows, dim=1, out=output)

    return CpuStandInExperts


def reference_moe(x, w1, w2, topk_weights, topk_ids) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(topk_ids.size(1)):
        e = topk_ids[:, j].long()
        h = torch.einsum("mk,mnk->mn", x.float(), w1[e].float())
        n = h.size(-1) // 2
        a = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        out += torch.einsum("mn,mkn->mk", a, w2[e].float()) * topk_weights[:, j : j + 1].float()
    return out


def count_events(prof, device: str) -> dict[str, int]:
    aten_copy = memcpy_dtod = copy_kernels = 0
    for evt in prof.events():
        name = evt.name
        device_type = str(getattr(evt, "device_type", "")).split(".")[-1]
        on_device = device_type not in ("CPU", "")
        if name == "aten::copy_" and not on_device:
            # Only copies called directly, not those inside another aten op
            # (e.g. the one making a contiguous operand for a matmul).
            parent = evt.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                aten_copy += 1
        elif on_device and "Memcpy DtoD" in name:
            memcpy_dtod += 1
        elif on_device and "copy" in name.lower() and "Memcpy" not in name:
            copy_kernels += 1
    counts = {"aten_copy": aten_copy}
    if device != "cpu":
        counts["memcpy_dtod"] = memcpy_dtod
        counts["copy_kernels"] = copy_kernels
    return counts


def run_case(
    M: int, E: int, topk: int, K: int, N: int, device: str, mode: str, seed: int = 0
) -> dict[str, Any]:
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
    )
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import (
        MoEPrepareAndFinalizeNoDPEPModular,
    )

    dtype = torch.bfloat16
    torch.manual_seed(seed)
    moe_config = make_moe_config(E, topk, K, N, dtype, device)
    if device == "cpu":
        experts_cls = make_cpu_standin_experts_cls()
    else:
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import (
            TritonExperts,
        )

        experts_cls = TritonExperts
    experts = experts_cls(moe_config, FUSED_MOE_UNQUANTIZED_CONFIG)
    kernel = mk.FusedMoEKernel(MoEPrepareAndFinalizeNoDPEPModular(), experts)

    x = torch.randn(M, K, dtype=dtype, device=device) / 8
    w1 = torch.randn(E, 2 * N, K, dtype=dtype, device=device) / 32
    w2 = torch.randn(E, K, N, dtype=dtype, device=device) / 32
    topk_weights = torch.rand(M, topk, dtype=torch.float32, device=device)
    topk_ids = torch.stack([torch.randperm(E, device=device)[:topk] for _ in range(M)]).to(
        torch.int32
    )

    def forward() -> torch.Tensor:
        return kernel.apply(
            hidden_states=x,
            w1=w1,
            w2=w2,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            activation=MoEActivation.SILU,
            global_num_experts=E,
            expert_map=None,
            apply_router_weight_on_input=False,
        )

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with decision_mode(mode):
        forward()  # warm-up: Triton compilation and autotuning
        if device != "cpu":
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            out = forward()
            if device != "cpu":
                torch.cuda.synchronize()

    ref = reference_moe(x, w1, w2, topk_weights, topk_ids)
    counts = count_events(prof, device)
    return {
        "M": M,
        "E": E,
        "topk": topk,
        "K": K,
        "N": N,
        "dtype": "bfloat16",
        "mode": mode,
        "experts": experts_cls.__name__,
        "max_abs_err": float((out.float() - ref).abs().max()),
        **counts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device; use --device cpu for the smoke test")
            return 2
        from vllm.v1.worker.workspace import init_workspace_manager

        init_workspace_manager(torch.device("cuda"))

    import vllm
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    has_hook = hasattr(mk.FusedMoEExpertsModular, "accepts_output_alias")
    rows = [
        run_case(
            m,
            args.experts,
            args.topk,
            args.hidden,
            args.intermediate,
            args.device,
            mode,
        )
        for m in args.m
        for mode in args.modes
    ]
    result = {
        "vllm_version": getattr(vllm, "__version__", "?"),
        "vllm_path": vllm.__file__,
        "has_accepts_output_alias": has_hook,
        "device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
        "torch": torch.__version__,
        "rows": rows,
    }

    cols = [
        "M",
        "mode",
        "experts",
        "aten_copy",
        "memcpy_dtod",
        "copy_kernels",
        "max_abs_err",
    ]
    cols = [c for c in cols if c in rows[0]]
    print(
        f"vLLM {result['vllm_version']} ({result['vllm_path']}), "
        f"accepts_output_alias hook: {has_hook}, device: {result['device']}"
    )
    print(" | ".join(f"{c:>13}" for c in cols))
    for row in rows:
        cells = [
            f"{row[c]:>13.3g}" if isinstance(row[c], float) else f"{row[c]!s:>13}" for c in cols
        ]
        print(" | ".join(cells))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
