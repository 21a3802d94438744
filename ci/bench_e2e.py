#!/usr/bin/env python3
"""End to end: vLLM's own engine serving Qwen MoE models, base vs patched.

Runs on the GPU machine from one ``ci/device_bundle.py`` bundle (both trees,
the release's compiled ops, the dependency wheels). Every measurement is a
fresh ``vllm.LLM`` process on one tree; processes of the two trees alternate
(ABBA: base, patched, patched, base, ...), so drift hits both alike.

Timing (dummy weights on the published config, full CUDA graphs for decode,
no torch.compile: vLLM 0.33.0 expects a newer torch than the machine has):

* decode ms per output token at each batch: (time of a 1+T-token generation
  minus a 1-token one) / T, T = 128, prompts of 32 tokens; with each
  repetition the process's CPU time over wall time, the share of wall time
  the host spent blocked on the GPU (in ``torch.cuda.Event.synchronize``,
  where vLLM waits for each step's tokens: near 0, the host sets the pace),
  the host's load and the GPU's SM clock and temperature, so a slow
  repetition shows whether the host or the GPU set it (``report``'s
  machine-state table);
* prefill ms of 1 x 2,048 and 4 x 2,048 prompt tokens (one engine step);
* ``--modes eager`` adds the same without CUDA graphs, where host cost shows;
* ``--profile``: GPU time per kernel of one 1 x 2,048 prefill and of one
  decode step at batch 1, 8 and 32 per process, and how the kernels fill the
  step: time with any stream busy and with two or more (and, for the
  prefill, the idle time within its span);
* ``--apply PATCH``: the patched tree also carries a candidate patch, applied
  on the device, so a patch is judged end to end before it joins the series;
  with ``--against series`` base is the series without it, so the ratios
  are the candidate's own, measured in one lease;
* ``--tp N``: every engine at tensor parallel N; ``--dp N``: data parallel N
  with expert parallelism, one engine process per rank started together (as
  in vLLM's offline data-parallel example), each rank given the same prompts,
  rank 0's numbers recorded, with the all-to-all backend vLLM picked (on
  an NCCL older than 2.29.7 both trees get ``nccl_for_all_to_all``'s loader
  fix). ``report`` also compares each tree's multi-GPU check with its
  one-GPU check, from the same files or from ``--one-gpu`` ones.

Correctness (``--check``): a small real checkpoint per model
(``e2e_models.make_checkpoint``), loaded through vLLM's normal loader on both
trees. Greedy tokens must be identical, or diverge only at a near tie (base
rated patched's token within ``--tie`` of its own, or within base's own mean
error against fp32 where that is larger), since a random-weight model's top
logits often sit one bf16 step apart. The same weights run in fp32
through transformers' own forward are the reference: each tree scores that
reference's continuation teacher-forced, and patched must be no further from
it than base (``--slack``).

    python3 ci/bench_e2e.py device --bundle .device/bundle --out "$OUT" \\
        --models a2.7b --procs 3 --check a2.7b,30b-a3b      # on the GPU machine
    python ci/bench_e2e.py report RAW.json... --md results/e2e-h200.md \\
        --json results/e2e-h200.json --png results/e2e-h200.png   # here
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_checks  # noqa: E402
import e2e_report  # noqa: E402
from e2e_driver import Driver, fits_budget, schedule  # noqa: E402
from e2e_engine import child_main  # noqa: E402
from e2e_models import MODELS  # noqa: E402

DEFAULT_BATCHES = (1, 4, 8, 16, 32, 64)


def device_main(args: argparse.Namespace) -> int:
    # Bad names fail here, before the bundle is unpacked on the GPU machine.
    if args.models:
        schedule(args.models, args.modes, args.procs, args.eager_procs)
    unknown = [m for m in args.check.split(",") if m and m not in MODELS]
    if unknown:
        raise SystemExit(f"bench_e2e: unknown model(s) for --check: {', '.join(unknown)}")
    if args.dp > 1 and args.profile:
        raise SystemExit("bench_e2e: --profile needs one engine process (not --dp)")
    if args.against == "series" and not args.apply:
        raise SystemExit("bench_e2e: --against series needs a candidate (--apply PATCH)")
    missing = [c for c in args.apply if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"bench_e2e: no candidate patch at {', '.join(missing)}")
    if args.models and not fits_budget(args.budget, args.first_estimate, opens_pair=True):
        raise SystemExit(
            f"bench_e2e: --budget {args.budget:g} s cannot start one base/patched pair of "
            f"--first-estimate {args.first_estimate:g} s (it needs twice that)"
        )
    driver = Driver(args)
    if args.check:
        driver.check_models()
    if args.models:
        driver.time_models()
    driver.raw["wall_s"] = time.monotonic() - driver.t0
    driver.save()
    rows = e2e_report.summarize(driver.raw["records"])
    print(e2e_report.table(rows) + diagnostics(driver.raw["records"]))
    if driver.raw["checks"]:
        print(e2e_checks.check_table(driver.raw["checks"]))
        print(e2e_checks.parallel_table(driver.raw["checks"], args.tie))
    for s in driver.raw["skipped"]:
        print("skipped:", s)
    return 0


def diagnostics(records: list[dict], profile_top: int = 15) -> str:
    """The kernel/host profile, allocator and machine-state tables, where the
    records have them."""
    text = ""
    if any("profile" in r for r in records):
        text += "\n" + e2e_report.profile_table(records, profile_top)
    if any(r.get("prefill_allocator") for r in records):
        text += "\n" + e2e_report.allocator_table(records)
    if any(r.get("decode_state") for r in records):
        text += "\n" + e2e_report.machine_table(records)
    return text


def read_raw(path: Path) -> str:
    """A raw file as written on the device, or xz-compressed as committed."""
    return lzma.open(path, "rt").read() if path.suffix == ".xz" else path.read_text()


def rejudge(check: dict, tie: float, slack: float) -> dict:
    """A check judged again from its stored outputs, so the committed raw
    files answer to the rule in this file; errors and older formats stay as
    recorded."""
    if check.get("error") or "ref" not in check or "outputs" not in check:
        return check
    verdict = e2e_checks.judge(check["model"], check["ref"], check["outputs"], tie, slack)
    return verdict | {"ref": check["ref"], "outputs": check["outputs"]}


def candidates(raws: list[dict]) -> str:
    """A line naming the candidate patches the patched tree carried, if any,
    and what base was (the release, or the series without them)."""
    applied = {(a["patch"], a["sha256"][:12]) for raw in raws for a in raw.get("applied", [])}
    if not applied:
        return ""
    names = ", ".join(f"{name} ({sha})" for name, sha in sorted(applied))
    base = "base = the series, " if raws[0].get("against") == "series" else ""
    return f"{base}patched = the series + candidate {names}\n\n"


def same_base(raws: list[dict], paths: list[str]) -> None:
    """Refuse to merge raw files whose base trees differ (the release in one,
    the series without a candidate in another): their ratios mean different
    things."""
    bases = [raw.get("against", "release") for raw in raws]
    if len(set(bases)) > 1:
        by = ", ".join(f"{p}: {b}" for p, b in zip(paths, bases, strict=True))
        raise SystemExit(f"bench_e2e report: the raw files compare against different bases ({by})")


def report_main(args: argparse.Namespace) -> int:
    raws = [json.loads(read_raw(Path(p))) for p in args.raw]
    same_base(raws, args.raw)
    records = [r for raw in raws for r in raw["records"]]
    checks = [rejudge(c, args.tie, args.slack) for raw in raws for c in raw["checks"]]
    one_gpu = [
        rejudge(c, args.tie, args.slack)
        for path in args.one_gpu
        for c in json.loads(read_raw(Path(path)))["checks"]
        if " " not in c["model"]
    ]
    rows = e2e_report.summarize(records)
    text = candidates(raws) + e2e_report.table(rows) + diagnostics(records, args.profile_top)
    if checks:
        text += "\n" + e2e_checks.check_table(checks)
        # a one-GPU check among the raw files stands before one from --one-gpu
        across = e2e_checks.parallel_table(one_gpu + checks, args.tie)
        text += "\n" + across if across else ""
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        summary = {
            "runs": [
                {k: raw.get(k) for k in ("bundle", "applied", "versions", "wall_s", "skipped")}
                for raw in raws
            ],
            "one_gpu_checks_from": args.one_gpu,
            "rows": rows,
            # the per-token outputs and the fp32 reference stay in the raw files
            "checks": [{k: v for k, v in c.items() if k not in ("ref", "outputs")} for c in checks],
        }
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.png:
        e2e_report.plot(rows, args.png)
    return 0


def add_judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tie",
        type=float,
        default=0.1,
        help="a divergence within this base margin (or base's fp32 error, if larger) is a near tie",
    )
    p.add_argument(
        "--slack", type=float, default=1.25, help="patched's fp32-reference error over base's, max"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("device", help="on the GPU machine: run both trees, write e2e-raw.json")
    d.add_argument("--bundle", required=True, help="ci/device_bundle.py output folder")
    d.add_argument("--out", required=True, help="folder for e2e-raw.json and e2e-log.txt")
    d.add_argument(
        "--models",
        default="",
        help=f"models to time, comma list of {','.join(MODELS)}; MODEL:N: N processes per tree",
    )
    d.add_argument(
        "--modes", default="graph", help="graph (full decode CUDA graphs), eager, or both"
    )
    d.add_argument("--procs", type=int, default=3, help="graph-mode processes per tree (default 3)")
    d.add_argument(
        "--eager-procs", type=int, default=2, help="eager processes per tree (default 2)"
    )
    d.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="decode batches")
    d.add_argument("--eager-batches", default="1,8,32", help="decode batches in eager mode")
    d.add_argument("--reps", type=int, default=3, help="repetitions per decode batch")
    d.add_argument("--prefill-reps", type=int, default=7, help="repetitions per prefill shape")
    d.add_argument(
        "--profile",
        action="store_true",
        help="also profile one 1 x 2,048 prefill and one decode step at batch 1, 8 "
        "and 32 per process: GPU time per kernel, and busy and overlapped GPU time",
    )
    d.add_argument(
        "--tp", type=int, default=1, help="tensor parallel size of every engine (default 1)"
    )
    d.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data parallel size with expert parallelism: one engine process per rank, "
        "rank 0's numbers recorded (default 1)",
    )
    d.add_argument("--check", default="", help="models for the correctness check, comma list")
    d.add_argument("--check-parallel", type=int, default=2, help="1: one tree at a time")
    add_judge_arguments(d)
    d.add_argument(
        "--apply",
        action="append",
        default=[],
        metavar="PATCH",
        help="also apply this candidate patch to the patched tree (repeatable): "
        "judge a patch end to end before it joins the series",
    )
    d.add_argument(
        "--against",
        choices=("release", "series"),
        default="release",
        help="what the patched tree is compared with: the pinned release (default), or, with "
        "--apply, the series without the candidate, which measures the candidate alone",
    )
    d.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds; no process starts past it or without time for its pair "
        "(below twice --first-estimate the run is refused before unpacking)",
    )
    d.add_argument("--first-estimate", type=float, default=75, help="seconds a process may take")

    c = sub.add_parser("child", help="one engine process (started by device)")
    c.add_argument("--tree", required=True)
    c.add_argument("--model", required=True, choices=list(MODELS))
    c.add_argument("--mode", default="graph", choices=("graph", "eager"))
    c.add_argument("--model-dir", required=True)
    c.add_argument("--batches", default="1")
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--prefill-reps", type=int, default=5)
    c.add_argument("--profile", action="store_true")
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--dp", type=int, default=1)
    c.add_argument("--check", action="store_true")
    c.add_argument("--ref", help="the fp32 reference (--check)")
    c.add_argument("--json", required=True)

    r = sub.add_parser("report", help="here: tables, JSON summary and plot from raw files")
    r.add_argument("raw", nargs="+", help="e2e-raw.json files (several calls are merged)")
    r.add_argument("--md", help="write the Markdown tables here")
    r.add_argument("--json", help="write the summary JSON here")
    r.add_argument("--png", help="write the decode ratio plot here")
    r.add_argument(
        "--one-gpu",
        nargs="+",
        default=[],
        metavar="RAW",
        help="raw files of one-GPU checks that the multi-GPU checks are compared with, per "
        "tree, when the raw files given have none (nothing else of them is reported)",
    )
    r.add_argument(
        "--profile-top",
        type=int,
        default=15,
        help="kernels and host events per profile table, the largest differences first",
    )
    add_judge_arguments(r)

    args = p.parse_args(argv)
    return {"device": device_main, "child": child_main, "report": report_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
