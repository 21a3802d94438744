"""Summaries of ``ci/bench_e2e.py`` runs: medians, spreads, ratios, tables.

Everything here is plain arithmetic on the raw records, so CI checks it on
CPU. One raw record is one engine process:

    {"model": "a2.7b", "mode": "graph", "tree": "base", "seq": 0,
     "decode_ms": {"1": [2.76, 2.77, 2.75], ...},     # ms per output token
     "prefill_ms": {"1x2048": [41.0, ...], ...}}        # ms per prefill

A process's value is the median of its repetitions; a tree's value is the
median over its processes. The ratio is patched / base time (below 1 is
faster). Its range pairs the extremes (fastest patched process against the
slowest base process and the reverse). The noise band a ratio has to clear
is the larger of the base-vs-base and the patched-vs-patched spread (the
largest ratio between two processes of one tree, minus one): a difference
between the trees counts only when it exceeds what either tree shows
against itself.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from e2e_timeline import PER_STEP_TIMELINE

METRICS = ("decode_ms", "prefill_ms")


def _key_order(key: str) -> tuple:
    head = key.split("x")[0]
    return (int(head) if head.isdigit() else 0, key)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, mode, metric, key) with both trees' processes."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"base": [], "patched": []})
    for rec in records:
        if rec.get("error"):
            continue
        for metric in METRICS:
            for key, reps in rec.get(metric, {}).items():
                if reps:
                    cell = cells[(rec["model"], rec["mode"], metric, key)]
                    cell[rec["tree"]].append(statistics.median(reps))
    rows = []
    for (model, mode, metric, key), per_tree in sorted(
        cells.items(), key=lambda kv: (kv[0][:3], _key_order(kv[0][3]))
    ):
        rows.append(_row(model, mode, metric, key, per_tree["base"], per_tree["patched"]))
    return rows


def profile_table(records: list[dict], top: int = 15) -> str:
    """Where a profiled step's time goes, per model and mode: each kernel's
    GPU time (median over a tree's processes), base against patched, the
    kernels that differ most first, after the kernels' sum and the wall, and
    how much of each kernel's time it ran beside other GPU work (raw files
    from before that was recorded show "–"); then the host events (self CPU
    time) the same way, and for decode steps the GPU's idle gaps by the
    kernels around them (``e2e_timeline.idle_gaps``; none in raw files from
    before them)."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.get("error"):
            continue
        steps = [rec["profile"]] if "profile" in rec else []
        steps += [
            _busy_times_only(rec["decode_profiles"][b])
            for b in sorted(rec.get("decode_profiles", {}), key=int)
        ]
        for prof in steps:
            groups[(rec["model"], rec["mode"], prof.get("step", ""))][rec["tree"]].append(prof)
    out = []
    for (model, mode, step), trees in sorted(groups.items()):
        for section, column, what in (
            ("kernels", "kernel", "GPU µs per kernel"),
            ("host", "host event", "host µs per event"),
            ("idle_gaps", "idle gap: kernel before → kernel after", "GPU idle µs per gap"),
        ):
            kernels = section == "kernels"
            med: dict[str, dict[str, float]] = {}
            beside: dict[str, dict[str, float]] = {}
            for tree, profiles in trees.items():
                events = [p.get(section, {}) for p in profiles]
                names = {k for e in events for k in e}
                med[tree] = {
                    k: statistics.median(e.get(k, {}).get("us", 0.0) for e in events) for k in names
                }
                if section == "idle_gaps" and names:
                    med[tree]["(all gaps)"] = statistics.median(
                        sum(g["us"] for g in e.values()) for e in events
                    )
                if kernels:
                    beside[tree] = {
                        k: statistics.median(e.get(k, {}).get("beside_us", 0.0) for e in events)
                        for k in names
                        if all("beside_us" in e[k] for e in events if k in e)
                    }
                    med[tree]["(all kernels)"] = statistics.median(
                        sum(k["us"] for k in e.values()) for e in events
                    )
                    med[tree]["(wall)"] = statistics.median(1000 * p["wall_ms"] for p in profiles)
                    med[tree].update(
                        _timeline_rows([p["timeline"] for p in profiles if "timeline" in p])
                    )
            base, patched = med.get("base", {}), med.get("patched", {})
            if not base and not patched:
                continue
            totals = [
                t
                for t in ("(all kernels)", "(wall)", *TIMELINE_ROWS, "(all gaps)")
                if t in base or t in patched
            ]
            names = totals + sorted(
                (set(base) | set(patched)) - set(totals),
                key=lambda k: (-abs(patched.get(k, 0) - base.get(k, 0)), k),
            )
            header = f"| {column} | base µs | patched µs | patched − base |"
            rule = "|---|---:|---:|---:|"
            if kernels:
                header += " beside other GPU work, base / patched µs |"
                rule += "---:|"
            out.append(f"{model} {mode}, {step}: {what}, median over processes\n\n{header}\n{rule}")
            for k in names[: top + len(totals)]:
                b, p = base.get(k, 0.0), patched.get(k, 0.0)
                label = (
                    " → ".join(side[:38] for side in k.split(" → "))
                    if section == "idle_gaps"
                    else k
                )
                row = f"| `{label[:80]}` | {b:.1f} | {p:.1f} | {p - b:+.1f} |"
                if kernels:
                    row += f" {_beside_cell(beside, k)} |"
                out.append(row)
            out.append("")
    return "\n".join(out)


def _beside_cell(beside: dict[str, dict[str, float]], kernel: str) -> str:
    """Base / patched time beside other GPU work, "–" where a tree ran no
    such kernel or its raw files did not record it."""
    cells = []
    for tree in ("base", "patched"):
        us = beside.get(tree, {}).get(kernel)
        cells.append("–" if us is None else f"{us:.1f}")
    return " / ".join(cells)


TIMELINE_ROWS = {
    "(GPU busy: any stream)": "busy_us",
    "(GPU busy: two or more streams)": "overlap_us",
    "(GPU idle within the span)": "idle_us",
}


def _busy_times_only(decode_profile: dict) -> dict:
    """A decode step's profile without the span fields that raw files
    recorded before ``e2e_engine.profile_decode`` stopped differencing them."""
    if "timeline" not in decode_profile:
        return decode_profile
    kept = {k: decode_profile["timeline"][k] for k in PER_STEP_TIMELINE}
    return {**decode_profile, "timeline": kept}


def _timeline_rows(timelines: list[dict]) -> dict[str, float]:
    """The medians of ``e2e_engine.gpu_timeline`` fields over processes, as
    rows of the kernel table; none for profiles recorded without one, and no
    idle row per decode step (``e2e_engine.profile_decode`` says why)."""
    rows = {}
    for label, field in TIMELINE_ROWS.items():
        values = [t[field] for t in timelines if field in t]
        if values:
            rows[label] = statistics.median(values)
    return rows


def allocator_table(records: list[dict]) -> str:
    """Device allocations, frees and allocation retries of the CUDA caching
    allocator during each process's timed prefill steps: a step that no longer
    fits the cached blocks frees them and allocates anew, each a device-wide
    synchronisation."""
    rows = ["| model | mode | prefill | tree | device allocs | device frees | alloc retries |"]
    rows.append("|---|---|---|---|---|---|---|")
    for rec in sorted(records, key=lambda r: (r["model"], r["mode"], r.get("seq", 0))):
        counts = rec.get("prefill_allocator", {})
        for shape in sorted(counts, key=_key_order):
            c = counts[shape]
            rows.append(
                f"| {rec['model']} | {rec['mode']} | {shape} | {rec['tree']} "
                f"| {c.get('num_device_alloc', 0)} | {c.get('num_device_free', 0)} "
                f"| {c.get('num_alloc_retries', 0)} |"
            )
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def machine_table(records: list[dict]) -> str:
    """Each process's decode repetitions beside the state of the machine
    they ran in (``e2e_engine.time_decode``): ms per output token, the
    process's CPU time over wall time, the host's time blocked on the GPU
    over wall time, the host's load, the GPU's SM clock and temperature.
    Raw files from before these were recorded give none, shown as –."""
    rows = [
        "| model | mode | tree | process | batch | ms/token per repetition "
        "| host CPU / wall | waiting on the GPU / wall | load (1 min) | SM MHz | GPU °C |",
        "|---|---|---|---:|---:|---|---|---|---:|---|---:|",
    ]
    for rec in records:
        for batch, states in sorted(rec.get("decode_state", {}).items(), key=lambda kv: int(kv[0])):
            reps = rec["decode_ms"].get(batch, [])

            def readings(key, states=states):
                return [s[key] for s in states if s.get(key) is not None]

            clocks, temps, loads = readings("sm_mhz"), readings("gpu_c"), readings("load1")
            ms = " ".join(f"{r:.3f}" for r in reps)
            cpu = " ".join(f"{s['host_cpu_share']:.2f}" for s in states)
            waits = readings("gpu_wait_share")
            wait = " ".join(f"{w:.2f}" for w in waits) if waits else "–"
            load = f"{max(loads):.1f}" if loads else "–"
            clock = f"{min(clocks)}–{max(clocks)}" if clocks else "–"
            temp = max(temps) if temps else "–"
            rows.append(
                f"| {rec['model']} | {rec['mode']} | {rec['tree']} | {rec.get('seq', '')} "
                f"| {batch} | {ms} | {cpu} | {wait} | {load} | {clock} | {temp} |"
            )
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def _spread(values: list[float]) -> float | None:
    """(max - min) / median over processes; None with fewer than two."""
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def _row(model, mode, metric, key, base: list[float], patched: list[float]) -> dict:
    row = {
        "model": model,
        "mode": mode,
        "metric": metric,
        "key": key,
        "base": base,
        "patched": patched,
        "base_median": statistics.median(base) if base else None,
        "patched_median": statistics.median(patched) if patched else None,
        "base_spread": _spread(base),
        "patched_spread": _spread(patched),
        "base_vs_base": _self_ratio(base),
        "patched_vs_patched": _self_ratio(patched),
        "ratio": None,
        "ratio_lo": None,
        "ratio_hi": None,
        "verdict": "incomplete",
    }
    if base and patched:
        row["ratio"] = row["patched_median"] / row["base_median"]
        row["ratio_lo"] = min(patched) / max(base)
        row["ratio_hi"] = max(patched) / min(base)
        row["verdict"] = verdict(row["ratio"], noise_band(row))
    return row


def _self_ratio(values: list[float]) -> float | None:
    """The largest ratio between two processes of one tree, minus one."""
    return max(values) / min(values) - 1 if len(values) >= 2 else None


def noise_band(row: dict) -> float | None:
    """The larger of the two trees' own spreads; None without a base band."""
    if row["base_vs_base"] is None:
        return None
    return max(row["base_vs_base"], row.get("patched_vs_patched") or 0.0)


def verdict(ratio: float, band: float | None) -> str:
    """'faster' / 'slower' when the ratio leaves the noise band, 'neutral'
    inside it, 'unknown' without a band (one base process)."""
    if band is None:
        return "unknown"
    if ratio < 1 - band:
        return "faster"
    if ratio > 1 + band:
        return "slower"
    return "neutral"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows, one line each."""
    head = (
        "| model | mode | metric | batch | base ms (n) | patched ms (n) | "
        "patched/base [range] | spread base / patched | base-vs-base / patched-vs-patched "
        "| verdict |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        what = "decode ms/token" if r["metric"] == "decode_ms" else "prefill ms"
        ratio = (
            f"{r['ratio']:.3f} [{r['ratio_lo']:.3f}–{r['ratio_hi']:.3f}]"
            if r["ratio"] is not None
            else "–"
        )
        lines.append(
            f"| {r['model']} | {r['mode']} | {what} | {r['key']} "
            f"| {_fmt(r['base_median'], '.3f')} ({len(r['base'])}) "
            f"| {_fmt(r['patched_median'], '.3f')} ({len(r['patched'])}) "
            f"| {ratio} | {_pct(r['base_spread'])} / {_pct(r['patched_spread'])} "
            f"| {_pct(r['base_vs_base'])} / {_pct(r.get('patched_vs_patched'))} "
            f"| {r['verdict']} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    """Decode patched/base ratio against batch, one line per model and mode,
    with the ratio range as error bars and the noise band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["metric"] == "decode_ms" and r["ratio"] is not None:
            series[(r["model"], r["mode"])].append(r)
    for (model, mode), rs in sorted(series.items()):
        rs.sort(key=lambda r: int(r["key"]))
        xs = [int(r["key"]) for r in rs]
        ys = [r["ratio"] for r in rs]
        err = [
            [r["ratio"] - r["ratio_lo"] for r in rs],
            [r["ratio_hi"] - r["ratio"] for r in rs],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{model} {mode}")
        band = [noise_band(r) or 0.0 for r in rs]
        ax.fill_between(xs, [1 - b for b in band], [1 + b for b in band], alpha=0.08)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch (sequences)")
    ax.set_ylabel("patched / base, ms per token")
    ax.set_title("vLLM engine decode, patched vs base (H200)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
