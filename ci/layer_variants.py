#!/usr/bin/env python3
"""Diagnostic variants of the unpacked layer-benchmark trees (issue 9).

Runs ON the GPU device, after ``device_harness.unpack_bundle`` made
``<work>/base`` and ``<work>/patched``. Each variant is a copy of one of them
with one edit, timed beside the two by ``ci/bench_layers.py run --also
LABEL=<work>/LABEL``. They answer why the patched Qwen1.5-MoE-A2.7B block at
N = 1 runs at one of two speeds under CUDA graphs (``ci/device_race.sh``):

* ``nogate``: the patched tree without the gate patch (patches 1-3 only);
* ``pad3``: the patched tree plus three no-op elementwise kernels after the
  fused gate, so the shared expert's branch of the graph has as many kernels
  as base's (the fused gate replaced four kernels by one). Nothing else
  changes: the output is bit-identical to the patched tree's;
* ``rf-base`` / ``rf-patched``: the shared expert enqueued on its aux stream
  after expert selection instead of before the router (vLLM 0.33.0 launches it
  first), so the routing kernels do not run beside the shared expert's GEMM.

Not part of the series: these exist to measure, never to ship.

    python3 ci/layer_variants.py --work /tmp/bl nogate pad3 rf-base rf-patched
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GATE_PATCH = REPO / "patches" / "qwen-shared-expert-gate.patch"
RUNNER = "vllm/model_executor/layers/fused_moe/runner/moe_runner.py"
QWEN2 = "vllm/model_executor/models/qwen2_moe.py"
LAUNCH_BEFORE_ROUTER = """\
            shared_experts_overlapping = self._shared_experts.maybe_forward_async(
                shared_experts_input
            )
"""
AFTER_SELECT = """\
                topk_indices_dtype=self._quant_method.topk_indices_dtype,
                input_ids=input_ids,
            )
"""
LAUNCH_AFTER_SELECT = """\
            if self._shared_experts is not None:
                shared_experts_overlapping = (
                    self._shared_experts.maybe_forward_async(shared_experts_input)
                )
"""
GATE_CALL = "            out = apply_shared_expert_gate(self.expert_gate, x, out)\n"
ROUTE_FIRST = [
    (RUNNER, LAUNCH_BEFORE_ROUTER, "            pass\n"),
    (RUNNER, AFTER_SELECT, AFTER_SELECT + LAUNCH_AFTER_SELECT),
]
#: variant -> (source tree, text edits (file, old, new); None: revert the gate patch)
VARIANTS: dict[str, tuple[str, list[tuple[str, str, str]] | None]] = {
    "nogate": ("patched", None),
    "pad3": (
        "patched",
        [(QWEN2, GATE_CALL, GATE_CALL + "            out = ((out + 0) * 1) - 0\n")],
    ),
    "rf-base": ("base", ROUTE_FIRST),
    "rf-patched": ("patched", ROUTE_FIRST),
}


def make(work: Path, name: str) -> Path:
    src, edits = VARIANTS[name]
    dst = work / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / src, dst, symlinks=True)
    if edits is None:
        subprocess.run(["patch", "-R", "-p1", "-s", "-i", str(GATE_PATCH)], cwd=dst, check=True)
        return dst
    for rel, old, new in edits:
        path = dst / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: {rel}: the text to edit is not there exactly once")
        path.write_text(text.replace(old, new))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder holding base/ and patched/")
    ap.add_argument("names", nargs="+", choices=sorted(VARIANTS))
    args = ap.parse_args(argv)
    for name in args.names:
        print(f"{name}: {make(Path(args.work), name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
