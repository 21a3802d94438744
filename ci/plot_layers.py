#!/usr/bin/env python3
"""Plot and tabulate a ``ci/bench_layers.py`` result (issue 9).

Runs here (no GPU): reads ``results/layers-h100.json.xz`` and writes
``results/layers-h100.png`` (speed-up base/patched vs N per config, eager and
CUDA-graph replay, per-round min/max as error bars, the base-vs-base noise as a
band) and ``results/layers-h100.md`` (the README table). Needs matplotlib::

    python ci/plot_layers.py [--json results/layers-h100.json.xz] [--png ...] [--md ...]
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BAR_SPEEDUP = 1.06


def _short(v: str | None) -> str:
    return (v or "?")[:12]


def _kernel_summary(prof: dict, mode: str = "eager") -> str:
    p = prof.get(mode) or {}
    if not p:
        return "-"
    return f"{p.get('n_events', '?')} ({p.get('n_dtod', 0)} DtoD)"


def _span(prof: dict) -> str:
    """Device span of one graph replay, and where each stream's work ends."""
    g = prof.get("graph") or {}
    if g.get("span_us") is None:
        return "-"
    ends = [v["last_end_us"] for v in (g.get("streams") or {}).values()]
    tail = f" (streams end {', '.join(f'{e:.1f}' for e in ends)})" if len(ends) > 1 else ""
    return f"{g['span_us']:.1f}{tail}"


def _kernel_diff(profiles: dict, config: str) -> str:
    """Kernels the patched forward no longer runs, and new ones (eager, N=1)."""
    prof = profiles.get(config) or {}
    base = (prof.get("base") or {}).get("eager") or {}
    pat = (prof.get("patched") or {}).get("eager") or {}
    if not base or not pat:
        return ""

    def names(p: dict) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in p.get("events", []):
            key = e["name"].split("(")[0].split("<")[0].strip()[:48]
            out[key] = out.get(key, 0) + 1
        return out

    b, q = names(base), names(pat)
    gone = [f"{k} x{b[k] - q.get(k, 0)}" for k in b if b[k] > q.get(k, 0)]
    new = [f"{k} x{q[k] - b.get(k, 0)}" for k in q if q[k] > b.get(k, 0)]
    parts = []
    if gone:
        parts.append("removed: " + ", ".join(gone))
    if new:
        parts.append("added: " + ", ".join(new))
    return "; ".join(parts) or "same kernels"


def write_md(res: dict, path: Path) -> None:
    v = res.get("versions", {})
    t = res.get("trees", {})
    s = res.get("settings", {})
    lines = [
        f"Layer-level A/B on **{v.get('device', '?')}** ({res.get('date', '?')}; "
        f"torch {v.get('torch', '?')}, triton {v.get('triton', '?')}, "
        f"CUDA {v.get('cuda', '?')}, driver {v.get('driver', '?')}). "
        f"Base tree `{_short(t.get('base', {}).get('rev'))}` "
        f"(vllm/ sha256 `{_short(t.get('base', {}).get('vllm_sources_sha256'))}`), "
        f"patched `{_short(t.get('patched', {}).get('rev'))}` "
        f"(`{_short(t.get('patched', {}).get('vllm_sources_sha256'))}`)"
        + (" — **A/A run: both trees identical**." if res.get("a_a_run") else "."),
        "",
        (
            f"Times in µs, median of {s.get('rounds', '?')} rounds (base and "
            "patched alternated, ABBA), each round the median of "
            + (
                f"{s.get('calls_graph')} (graph) / {s.get('calls_eager')} (eager) single calls"
                if s.get("flush_mb")
                else f"{s.get('reps', '?')} CUDA-event timed loops"
            )
            + ". *x* = base/patched "
            "(>1: patched faster); *range* = min–max of the per-round ratios; "
            "*spread* = max(largest deviation of a base round from the base "
            "median, |base/base2 - 1| for a second base process when run with "
            f"--aa, floor {s.get('spread_floor', 0)}%); *A/A* = base/base2. "
            f"{s.get('timing', '')}. Shared expert on the aux stream: "
            + (
                "no (VLLM_DISABLE_SHARED_EXPERTS_STREAM=1)"
                if s.get("env", {}).get("VLLM_DISABLE_SHARED_EXPERTS_STREAM") == "1"
                else "yes for N <= 256 (vLLM default)"
            )
            + ". Eager times are host-dispatch bound and noisy (see spread). "
            "Outputs: relative L2 difference base vs patched (same weights and "
            "input, bf16)."
        ),
        "",
        (
            "| block | N | eager base | eager patched | x | graph base "
            "| graph patched | x | range | A/A | spread % | out rel-L2 |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in res.get("rows", []):
        e, g, o = row.get("eager"), row.get("graph"), row.get("outputs", {})
        if not e or not g:
            continue
        flag = " ⚠" if g.get("slower_beyond_spread") else ""
        aa = "-" if g.get("aa_ratio") is None else f"{g['aa_ratio']:.3f}"
        ok = "" if o.get("ok") else " **BAD**"
        lines.append(
            f"| {row['config']} | {row['n']} | {e['base_us']:.1f} | "
            f"{e['patched_us']:.1f} | {e['speedup']:.3f} | {g['base_us']:.1f} | "
            f"{g['patched_us']:.1f} | **{g['speedup']:.3f}**{flag} | "
            f"{g['ratio_min']:.3f}–{g['ratio_max']:.3f} | {aa} | "
            f"{g.get('spread_pct', g['noise_pct']):.2f} | "
            f"{o.get('rel_l2', float('nan')):.1e}{ok} |"
        )
    lines += ["", "Configs:", ""]
    for name, c in res.get("configs", {}).items():
        lines.append(
            f"- `{name}`: {c['title']}: hidden {c['hidden_size']}, "
            f"{c['num_experts']} experts, top-{c['num_experts_per_tok']}, "
            f"expert FFN {c['moe_intermediate_size']}, shared "
            f"{c['shared_expert_intermediate_size']}, norm top-k "
            f"{c['norm_topk_prob']}."
        )
    profiles = res.get("profiles", {})
    if profiles:
        lines += [
            "",
            (
                "Kernels in one eager forward at N=1 (torch profiler, device "
                "events); graph span: one profiled replay (hot L2; shows "
                "structure, not timing):"
            ),
            "",
            ("| block | base | patched | graph N=1 device span base / patched (µs) | difference |"),
            "|---|---:|---:|---:|---|",
        ]
        for name, prof in profiles.items():
            lines.append(
                f"| {name} | {_kernel_summary(prof.get('base', {}))} | "
                f"{_kernel_summary(prof.get('patched', {}))} | "
                f"{_span(prof.get('base', {}))} / {_span(prof.get('patched', {}))} | "
                f"{_kernel_diff(profiles, name)} |"
            )
    vd = res.get("verdict", {})
    if vd:
        sp = ", ".join(f"{k} {x:.3f}x" for k, x in vd.get("bar_speedup_graph_n1", {}).items())
        slower = ", ".join(vd.get("slower_beyond_spread", []))
        lines += [
            "",
            (
                f"Bar (graph replay, N=1, ≥ {BAR_SPEEDUP:.2f}x): {sp or '-'}; "
                f"slower than base beyond the noise: {slower or 'none'}; "
                "outputs within bf16 rounding: "
                f"{'yes' if vd.get('outputs_ok') else 'NO'}; "
                + (
                    "A/A run (identical trees): no bar applies, it measures the spread."
                    if res.get("a_a_run")
                    else f"**bar {'met' if vd.get('bar_met') else 'not met'}**."
                )
            ),
        ]
    if res.get("partial"):
        lines += [
            "",
            "**Partial result** (the run stopped early): " + str(res.get("error", ""))[-300:],
        ]
    path.write_text("\n".join(lines) + "\n")


def write_png(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res.get("rows", []) if r.get("graph") and r.get("eager")]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=False)
    for ax, mode in zip(axes, ("graph", "eager"), strict=False):
        for name in configs:
            rs = sorted((r for r in rows if r["config"] == name), key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            sp = [r[mode]["speedup"] for r in rs]
            lo = [r[mode]["speedup"] - r[mode]["ratio_min"] for r in rs]
            hi = [r[mode]["ratio_max"] - r[mode]["speedup"] for r in rs]
            line = ax.errorbar(ns, sp, yerr=[lo, hi], marker="o", capsize=3, label=name)
            noise = [r[mode].get("spread_pct", r[mode]["noise_pct"]) / 100 for r in rs]
            ax.fill_between(
                ns,
                [1 - x for x in noise],
                [1 + x for x in noise],
                color=line[0].get_color(),
                alpha=0.08,
            )
        ax.axhline(1.0, color="k", lw=0.8)
        if mode == "graph":
            ax.axhline(BAR_SPEEDUP, color="r", lw=0.8, ls="--", label="bar (N=1)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_title("CUDA-graph replay" if mode == "graph" else "eager (host-dispatch bound)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up base / patched (>1: patched faster)")
    axes[0].legend(fontsize=8)
    v = res.get("versions", {})
    title = (
        f"vLLM Qwen sparse-MoE block, patched vs base — {v.get('device', '?')}, "
        f"{res.get('date', '?')[:10]}"
    )
    if res.get("a_a_run"):
        title += " (A/A: identical trees)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _race(kernels: list[list]) -> dict | None:
    """One profiled replay: does the routed experts' first GEMM (w13) start
    before the shared expert's down projection (the kernel after its SiLU)?"""
    w13 = next((k for k in kernels if k[0].startswith("fused_moe_kernel")), None)
    silu = next((k for k in kernels if "fused_mul_silu" in k[0]), None)
    if w13 is None or silu is None:
        return None
    after = [k for k in kernels if k[1] == silu[1] and k[2] > silu[2]]
    if not after:
        return None
    down = min(after, key=lambda k: k[2])
    span = max(k[2] + k[3] for k in kernels) - min(k[2] for k in kernels)
    return {"routed_first": w13[2] < down[2], "span": span, "w13_start": w13[2]}


def _graph_us(res: dict, config: str, label: str) -> float | None:
    for row in res.get("rows", []):
        if row["config"] == config and row["n"] == 1 and row.get("graph"):
            g = row["graph"]
            if label in ("base", "patched"):
                return g[f"{label}_us"]
            return g.get("also", {}).get(label, {}).get("us")
    return None


def race_md(results: list[tuple[str, dict]]) -> str:
    """Per process: timed graph replay, and which branch won the race in its
    profiled cold replays (``ci/bench_layers.py --cold-replays``)."""
    med = statistics.median
    lines = []
    for run, res in results:
        v, st, t = res.get("versions", {}), res.get("settings", {}), res.get("trees", {})
        prio = st.get("capture_priority")
        lines.append(
            f"- `{run}`: {v.get('device', '?')}, {res.get('date', '?')}, torch "
            f"{v.get('torch', '?')}, triton {v.get('triton', '?')}; base "
            f"`{_short(t.get('base', {}).get('rev'))}`, patched "
            f"`{_short(t.get('patched', {}).get('rev'))}`; N = 1, {st.get('rounds', '?')} "
            f"rounds x {st.get('calls_graph', '?')} cold graph replays; graphs captured at "
            + ("the default stream priority (0, as vLLM)" if prio is None else f"priority {prio}")
        )
    lines += [
        "",
        "Per process (tree): the timed median of the block's CUDA-graph replay, and in "
        "its 40 profiled cold replays (queued like the timing: flush, replay, ...) how "
        "often the routed experts' first GEMM (w13) started before the shared expert's "
        "down projection, the replay's device span (µs from the end of the flush) in "
        "each case, and the median w13 start. Trees: second processes of the same tree "
        "are `base2`/`patched2`; `nogate`, `pad3`, `rf-*` are `ci/layer_variants.py`'s.",
        "",
        "| block | run | process (tree) | graph replay µs (timed) | replays routed w13 first "
        "| span routed first | span shared down first | w13 start |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run, res in results:
        for config, prof in res.get("profiles", {}).items():
            for label, p in prof.items():
                reps = (p.get("cold_replays") or {}).get("replays") or []
                got = [r for r in (_race(x["kernels"]) for x in reps) if r]
                if not got:
                    continue
                won = [r["span"] for r in got if r["routed_first"]]
                lost = [r["span"] for r in got if not r["routed_first"]]
                us = _graph_us(res, config, label)
                lines.append(
                    f"| {config} | {run} | {label} | {'-' if us is None else f'{us:.1f}'} | "
                    f"{len(won)}/{len(got)} | {f'{med(won):.1f}' if won else '-'} | "
                    f"{f'{med(lost):.1f}' if lost else '-'} | "
                    f"{med(r['w13_start'] for r in got):.1f} |"
                )
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict:
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    return json.loads(raw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--json",
        default=str(REPO / "results" / "layers-h100.json.xz"),
        help="a ci/bench_layers.py result (.json or .json.xz)",
    )
    ap.add_argument("--png", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument(
        "--race",
        nargs="+",
        metavar="JSON",
        help="instead: tabulate the per-replay race of these ci/device_race.sh results "
        "(.json or .json.xz) into --md",
    )
    args = ap.parse_args(argv)
    if args.race:
        if not args.md:
            ap.error("--race needs --md")
        runs = [(Path(f).name.split(".json")[0], _load(Path(f))) for f in args.race]
        Path(args.md).write_text(race_md(runs))
        print(f"wrote {args.md}")
        return 0
    src = Path(args.json)
    res = _load(src)
    stem = src.parent / src.name.split(".json")[0]
    md = Path(args.md) if args.md else stem.with_suffix(".md")
    png = Path(args.png) if args.png else stem.with_suffix(".png")
    write_md(res, md)
    write_png(res, png)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
