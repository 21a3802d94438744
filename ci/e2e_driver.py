"""The device side of ``ci/bench_e2e.py device``: unpack the bundle's trees,
apply candidate patches, and run the engine processes (``bench_e2e.py
child``, one tree each) in an ABBA order within the time budget, the checks
first; every result goes into one raw file as it arrives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import e2e_checks
from e2e_engine import CHECK_TOKENS, DECODE_TOKENS, PROMPT_LEN, SEED, check_prompts, log
from e2e_models import MODELS

# What each engine process runs: bench_e2e.py's ``child`` command.
CHILD_SCRIPT = Path(__file__).with_name("bench_e2e.py")
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
                [sys.executable, str(CHILD_SCRIPT), *cmd],
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
            verdict = e2e_checks.judge(label, ref, outs, self.args.tie, self.args.slack)
            self.raw["checks"].append(verdict | {"ref": ref, "outputs": outs})
            self.save()
            log(f"check {model}: passed={verdict.get('passed')} {verdict.get('error', '')}")
