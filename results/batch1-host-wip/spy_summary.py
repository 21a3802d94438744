"""Where the engine's host time goes during the timed decode, per tree.

Reads py-spy's raw (collapsed) stacks of `ci/bench_e2e.py device` runs, kept
to the stacks under `time_decode` (`device-run-2.sh` does that on the
device), drops the prefill forwards (stacks through the model's eager
`forward`), and prints for each tree the samples under the main frames of a
decode step: vLLM's V2 model runner (`execute_model`, `sample_tokens`) and
the engine core. Then, per tree, the samples in Triton's Python launch path
(`kernel[grid](...)`: `KernelInterface.__getitem__`'s launcher and `JITFunction.run`), by the
function that launched the kernel.

Run: python3 spy_summary.py spy-decode.txt.xz
"""

import collections
import lzma
import re
import sys

ANCHORS = (
    "GPUModelRunner.execute_model",
    "GPUModelRunner.sample_tokens",
    "EngineCore.step_with_batch_queue",
    "LLMEngine.step",
)
PREFILL = "Qwen2MoeForCausalLM.forward"
TRITON_LAUNCH = ("KernelInterface.__getitem__", "JITFunction.run ")


def _frame(f: str) -> str:
    return re.sub(r":\d+\)", ")", f)


def summarize(path: str, top: int = 12) -> None:
    steps = collections.defaultdict(collections.Counter)
    launches = collections.defaultdict(collections.Counter)
    totals = collections.Counter()
    prefill = collections.Counter()
    with lzma.open(path, "rt") if path.endswith(".xz") else open(path) as f:
        for line in f:
            stack, samples = line.rstrip().rsplit(" ", 1)
            count = int(samples)
            tree = m.group(1) if (m := re.search(r"--tree (\w+)", stack)) else "?"
            if PREFILL in stack:
                prefill[tree] += count
                continue
            frames = stack.split(";")
            key = None
            for i, frame in enumerate(frames):
                for anchor in ANCHORS:
                    if frame.startswith(anchor + " "):
                        below = _frame(frames[i + 1]) if i + 1 < len(frames) else "(itself)"
                        key = f"{anchor} > {below}"
            steps[tree][key or "(other)"] += count
            totals[tree] += count
            for i, frame in enumerate(frames[1:], 1):
                if frame.startswith(TRITON_LAUNCH):
                    launches[tree][_frame(frames[i - 1])] += count
                    break
    for tree in sorted(totals):
        print(
            f"== {tree}: {totals[tree]} decode-loop samples "
            f"({prefill[tree]} more in the prefill forwards)"
        )
        for key, count in steps[tree].most_common(top):
            print(f"{count:6d} {100 * count / totals[tree]:5.1f} %  {key}")
        in_triton = sum(launches[tree].values())
        print(
            f"  Triton's Python launch path: {in_triton} samples, "
            f"{100 * in_triton / totals[tree]:.1f} %, launched from:"
        )
        for caller, count in launches[tree].most_common(top):
            print(f"{count:6d} {100 * count / totals[tree]:5.1f} %  {caller}")


if __name__ == "__main__":
    summarize(sys.argv[1])
