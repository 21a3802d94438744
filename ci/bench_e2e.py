#!/usr/bin/env python3
"""End to end: vLLM's own engine serving Qwen MoE models, base vs patched.

Runs on the GPU machine from one ``ci/device_bundle.py`` bundle (both trees,
the release's compiled ops, the dependency wheels). Every measurement is a
fresh ``vllm.LLM`` process on one tree; processes of the two trees alternate
(ABBA: base, patched, patched, base, ...), so drift hits both alike.

Timing (dummy weights on the published config, full CUDA graphs for decode,
no torch.compile: vLLM 0.33.0 expects a newer torch than the machine has):

* decode ms per output token at each batch: (time of a 1+T-token generation
  minus a 1-token one) / T, T = 128, prompts of 32 tokens;
* prefill ms of 1 x 2,048 and 4 x 2,048 prompt tokens (one engine step);
* ``--modes eager`` adds the same without CUDA graphs, where host cost shows;
* ``--profile``: GPU time per kernel of one 1 x 2,048 prefill and of one
  decode step at batch 1 and 8 per process, and how the kernels fill the
  step: time with any stream busy, with two or more, idle within the span,
  and each stream's busy time;
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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_report  # noqa: E402
from e2e_engine import (  # noqa: E402
    CHECK_TOKENS,
    DECODE_TOKENS,
    PROMPT_LEN,
    SEED,
    check_prompts,
    child_main,
    log,
)
from e2e_models import MODELS  # noqa: E402

DEFAULT_BATCHES = (1, 4, 8, 16, 32, 64)
ENGINE_ENV = {
    # The sampler's capability check would import FlashInfer, absent there.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # NVLink multicast stays off on the lent multi-GPU machines.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def parallel_label(tp: int, dp: int) -> str:
    """What a record's mode (or a check's model) gets appended for a
    multi-GPU run: " tp2", " dp2ep" (data parallel with expert parallel),
    both, or nothing on one GPU."""
    return (f" tp{tp}" if tp > 1 else "") + (f" dp{dp}ep" if dp > 1 else "")


def rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    """The environment of data-parallel rank ``rank`` of ``size`` on this host,
    as vLLM's offline data-parallel example sets it. The engine core runs in
    its own process there, which picks the rank's GPU."""
    return {
        "VLLM_DP_RANK": str(rank),
        "VLLM_DP_RANK_LOCAL": str(rank),
        "VLLM_DP_SIZE": str(size),
        "VLLM_DP_MASTER_IP": "127.0.0.1",
        "VLLM_DP_MASTER_PORT": str(port),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nccl_for_all_to_all(trees: list[Path]) -> dict:
    """Data parallel with expert parallel moves tokens through vLLM's own NCCL
    communicator, which vLLM 0.33.0 disables on an NCCL without
    ncclCommSuspend (older than 2.29.7, as torch's on the GPU machine). There
    both trees get the same loader fix (``skip_missing_nccl_suspend``); the
    raw file records the library and whether the fix was applied."""
    from device_harness import nccl_library, skip_missing_nccl_suspend

    info = nccl_library()
    info["suspend_skipped"] = "version" in info and not info["suspend"]
    if info["suspend_skipped"]:
        skip_missing_nccl_suspend(trees)
    log(f"NCCL {info}")
    return info


def apply_candidate(patch: Path, tree: Path) -> dict:
    """Apply a candidate patch (not yet in the series) to the patched tree, so
    the engine judges it on top of the series; raises if it does not apply."""
    import hashlib

    res = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", str(patch.resolve())],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise SystemExit(f"bench_e2e: {patch} does not apply: {res.stderr.strip()[:300]}")
    digest = hashlib.sha256(patch.read_bytes()).hexdigest()
    log(f"applied {patch.name} ({digest[:12]}) to the patched tree")
    return {"patch": patch.name, "sha256": digest}


def schedule(models: str, modes: str, procs: int, eager_procs: int) -> list[tuple]:
    """The timing processes in the order they run: (model, mode, index, tree).
    ``models`` is a comma list of MODEL or MODEL:N (N graph processes per tree)."""
    jobs = []
    for item in models.split(","):
        model, _, count = item.partition(":")
        if model not in MODELS:
            raise SystemExit(f"bench_e2e: unknown model {model!r} (known: {', '.join(MODELS)})")
        for mode in modes.split(","):
            n = int(count or procs) if mode == "graph" else eager_procs
            jobs += [(model, mode, i, tree) for i, tree in enumerate(abba(n))]
    return jobs


def fits_budget(left: float, need: float, opens_pair: bool) -> bool:
    """Whether a timing process that takes ``need`` seconds may start with
    ``left`` seconds of budget. One that would put its tree ahead of the other
    also needs time for the other tree's process: a process with nothing to
    compare against would only spend device time."""
    return left >= (2 * need if opens_pair else need)


def abba(procs: int) -> list[str]:
    """Tree order for ``procs`` processes per tree: base, patched, patched,
    base, base, patched, ..."""
    pairs = [("base", "patched") if i % 2 == 0 else ("patched", "base") for i in range(procs)]
    return [tree for pair in pairs for tree in pair]


# ==========================================================================
# the device driver: unpack, schedule processes, collect
# ==========================================================================


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        from device_harness import unpack_bundle, versions

        self.args = args
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        base, patched, self.site, manifest = unpack_bundle(Path(args.bundle), self.work)
        if args.against == "series":  # the series itself, before the candidate applies
            base = Path(shutil.copytree(patched, self.work / "series", symlinks=True))
        self.trees = {"base": base, "patched": patched}
        self.raw = {
            "kind": "bench_e2e",
            "bundle": {
                "created": manifest.get("created"),
                "version": manifest.get("version"),
                "base_rev": manifest.get("trees", {}).get("base_rev"),
                "head_rev": manifest.get("trees", {}).get("head_rev"),
            },
            "versions": versions(),
            "decode_tokens": DECODE_TOKENS,
            "prompt_len": PROMPT_LEN,
            "records": [],
            "checks": [],
            "skipped": [],
        }
        self.raw["against"] = args.against
        self.raw["applied"] = [apply_candidate(Path(c), patched) for c in args.apply]
        if args.dp > 1:
            self.raw["nccl"] = nccl_for_all_to_all([base, patched])
        self.durations: dict[tuple, float] = {}
        log(f"unpacked in {time.monotonic() - self.t0:.0f} s")

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        (self.out / "e2e-raw.json").write_text(json.dumps(self.raw, indent=1))

    def spawn(self, tree: str, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        env = {**os.environ, **ENGINE_ENV, **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join([str(self.trees[tree]), str(self.site)])
        # vLLM caches what it learns about a model class under one file name,
        # keyed by the hash of the model's module, which the series changes:
        # with one cache the trees would evict each other's entry, and every
        # process after a switch would inspect the model again in a
        # subprocess (~20 s on the H200 machine).
        env["VLLM_CACHE_ROOT"] = str(self.work / "vllm-cache" / tree)
        # The child writes through its own copy of the descriptor, so this
        # process closes its handle as soon as the child has started.
        with open(self.out / "e2e-log.txt", "a") as fh:
            fh.write(f"\n===== {tree}: {' '.join(cmd)}\n")
            fh.flush()
            return subprocess.Popen(
                [sys.executable, __file__, *cmd],
                env=env,
                cwd=self.work,
                stdout=fh,
                stderr=subprocess.STDOUT,
                # its own process group: a kill reaches an engine-core child too
                start_new_session=True,
            )

    def start(self, tree: str, cmd: list[str], res: Path) -> list[tuple]:
        """One measurement's processes: one, or with ``--dp N`` one per
        data-parallel rank (each writes its own result file)."""
        dp = self.args.dp
        if dp == 1:
            return [(self.spawn(tree, [*cmd, "--json", str(res)]), res)]
        port = free_port()
        started = []
        for rank in range(dp):
            path = res.with_name(f"{res.stem}-rank{rank}{res.suffix}")
            cmd_rank = [*cmd, "--json", str(path)]
            started.append((self.spawn(tree, cmd_rank, rank_env(rank, dp, port)), path))
        return started

    def collect(self, started: list[tuple]) -> dict:
        """Rank 0's result stands for the measurement; another rank's error
        makes it an error."""
        results = [self.wait(proc, path) for proc, path in started]
        rec = results[0]
        others = [f"rank {r}: {x['error']}" for r, x in enumerate(results) if r and x.get("error")]
        if others and not rec.get("error"):
            rec["error"] = "; ".join(others)
        return rec

    def wait(self, proc: subprocess.Popen, json_path: Path) -> dict:
        try:
            proc.wait(timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": "killed at the time budget"}
        if not json_path.exists():
            return {"error": f"process exited {proc.returncode} without a result"}
        return json.loads(json_path.read_text())

    def time_models(self) -> None:
        from e2e_models import write_config

        a = self.args
        jobs = schedule(a.models, a.modes, a.procs, a.eager_procs)
        started: Counter = Counter()
        for seq, (model, mode, i, tree) in enumerate(jobs):
            need = self.durations.get((model, mode), a.first_estimate)
            other = "patched" if tree == "base" else "base"
            opens_pair = started[model, mode, tree] >= started[model, mode, other]
            if not fits_budget(self.left(), need, opens_pair):
                self.raw["skipped"].append(f"{model} {mode} {tree} process {i}: budget")
                continue
            started[model, mode, tree] += 1
            mdir = self.work / "models" / model
            if not (mdir / "config.json").exists():
                write_config(model, MODELS[model]["layers"], mdir)
            res = self.work / f"time-{seq}.json"
            batches = a.batches if mode == "graph" else a.eager_batches
            cmd = ["child", "--tree", tree, "--model", model, "--mode", mode]
            cmd += ["--model-dir", str(mdir), "--batches", batches]
            cmd += ["--reps", str(a.reps), "--prefill-reps", str(a.prefill_reps)]
            cmd += ["--profile"] if a.profile else []
            cmd += ["--tp", str(a.tp), "--dp", str(a.dp)]
            t = time.monotonic()
            rec = self.collect(self.start(tree, cmd, res))
            took = time.monotonic() - t
            self.durations[(model, mode)] = max(self.durations.get((model, mode), 0), took)
            label = mode + parallel_label(a.tp, a.dp)
            rec |= {"model": model, "mode": label, "tree": tree, "seq": seq, "wall_s": took}
            self.raw["records"].append(rec)
            self.save()
            log(f"{model} {mode} {tree} #{i}: {took:.0f} s {rec.get('error', '')}")

    def check_models(self) -> None:
        from e2e_models import make_checkpoint

        for model in self.args.check.split(","):
            if self.left() < self.args.first_estimate:
                self.raw["skipped"].append(f"check {model}: budget")
                continue
            ckpt = self.work / "ckpt" / model
            try:
                ref = make_checkpoint(model, ckpt, check_prompts(), CHECK_TOKENS, SEED)
            except Exception as e:
                self.raw["checks"].append({"model": model, "error": f"checkpoint: {e}"[:300]})
                continue
            ref_path = self.work / f"ref-{model}.json"
            ref_path.write_text(json.dumps(ref))
            procs = {}
            for tree in ("base", "patched"):
                res = self.work / f"check-{model}-{tree}.json"
                cmd = ["child", "--check", "--tree", tree, "--model", model]
                cmd += ["--model-dir", str(ckpt), "--ref", str(ref_path)]
                cmd += ["--tp", str(self.args.tp), "--dp", str(self.args.dp)]
                procs[tree] = self.start(tree, cmd, res)
                if self.args.check_parallel < 2:
                    procs[tree] = self.collect(procs[tree])
            outs = {t: p if isinstance(p, dict) else self.collect(p) for t, p in procs.items()}
            label = model + parallel_label(self.args.tp, self.args.dp)
            verdict = e2e_report.judge(label, ref, outs, self.args.tie, self.args.slack)
            self.raw["checks"].append(verdict | {"ref": ref, "outputs": outs})
            self.save()
            log(f"check {model}: passed={verdict.get('passed')} {verdict.get('error', '')}")


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
        print(e2e_report.check_table(driver.raw["checks"]))
        print(e2e_report.parallel_table(driver.raw["checks"], args.tie))
    for s in driver.raw["skipped"]:
        print("skipped:", s)
    return 0


def diagnostics(records: list[dict], profile_top: int = 15) -> str:
    """The kernel/host profile and allocator tables, where the records have them."""
    text = ""
    if any("profile" in r for r in records):
        text += "\n" + e2e_report.profile_table(records, profile_top)
    if any(r.get("prefill_allocator") for r in records):
        text += "\n" + e2e_report.allocator_table(records)
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
    verdict = e2e_report.judge(check["model"], check["ref"], check["outputs"], tie, slack)
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
        text += "\n" + e2e_report.check_table(checks)
        # a one-GPU check among the raw files stands before one from --one-gpu
        across = e2e_report.parallel_table(one_gpu + checks, args.tie)
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
        help="also profile one 1 x 2,048 prefill and one decode step at batch 1 and 8 "
        "per process: GPU time per kernel, and busy, overlapped and idle GPU time",
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
    d.add_argument("--budget", type=float, default=540, help="seconds; no process starts past it")
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
