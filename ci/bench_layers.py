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

This file is the parent's A/B loop and the command line. The parts:
``device_harness`` (the bundle unpacked, the trees found), ``layer_blocks``
(configs, block builders, graph capture), ``layer_timing``, ``layer_profile``,
``layer_worker`` (the per-tree process and its pipe) and ``layer_analysis``
(outputs compared, medians, spread, verdict, table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

# unpack_bundle stays importable from here (older device scripts import it so)
from device_harness import find_trees, tree_digest, unpack_bundle, versions  # noqa: F401
from layer_analysis import compare_outputs, format_rows, summarize_rows, verdict
from layer_blocks import CONFIGS, DEFAULT_NS, SEED
from layer_worker import WorkerProc, worker_main


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_main(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or "layers-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.bundle:
        _log(f"unpacking {args.bundle} into {work}")
    base, patched, site, manifest = find_trees(
        args.bundle, args.base, args.patched, args.site, work
    )
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
        "versions": versions(),
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
