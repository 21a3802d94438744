"""Analysis of a layer A/B result: outputs compared, medians, spread, the bar, the table."""

from __future__ import annotations

import statistics
from pathlib import Path

from layer_blocks import BAR_CONFIGS, BAR_SPEEDUP


def compare_outputs(a: Path, b: Path) -> dict:
    import torch

    x = torch.load(a).float()
    y = torch.load(b).float()
    if x.shape != y.shape:
        return {"ok": False, "why": f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"}
    d = (x - y).abs()
    ref = y.abs().max().item() or 1.0
    rel_l2 = ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
    # bf16 has 8 significant bits: one rounding is <= 2^-8 relative; allow a
    # few roundings on the gate path (sigmoid * shared, then the add).
    ok = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
    ok = ok and rel_l2 <= 1e-2 and d.max().item() <= 2**-5 * ref
    return {
        "ok": ok,
        "identical": bool(torch.equal(x, y)),
        "max_abs": d.max().item(),
        "max_ref": ref,
        "rel_l2": rel_l2,
        "frac_differ": (d > 0).float().mean().item(),
    }


def summarize_rows(rows: list[dict], floor_pct: float = 0.0) -> None:
    """Fill medians, ratios and spread per row (in place).

    ``spread_pct`` = max(noise_pct, |aa_ratio - 1|, ``floor_pct``).
    """
    for row in rows:
        for mode in ("eager", "graph"):
            b = [r["base"][mode]["us"] for r in row["rounds"]]
            p = [r["patched"][mode]["us"] for r in row["rounds"]]
            if not b:
                continue
            bm, pm = statistics.median(b), statistics.median(p)
            ratios = [x / y for x, y in zip(b, p, strict=False)]
            noise = max(abs(x / bm - 1) for x in b) * 100
            pnoise = max(abs(x / pm - 1) for x in p) * 100
            # Further trees (--also), each as base / that tree's median.
            also = {
                label: [r[label][mode]["us"] for r in row["rounds"]]
                for label in row["rounds"][0]
                if label not in ("base", "patched", "order")
            }
            also_median = {label: statistics.median(t) for label, t in also.items()}
            spread = max(noise, floor_pct)
            aa = None
            if "base2" in also:
                # Base vs a second base process: the process-to-process part of
                # the spread, which rounds within one process cannot see.
                aa = bm / also_median["base2"]
                spread = max(spread, abs(aa - 1) * 100)
            row[mode] = {
                "base_us": round(bm, 3),
                "patched_us": round(pm, 3),
                "speedup": round(bm / pm, 4),
                "ratio_min": round(min(ratios), 4),
                "ratio_max": round(max(ratios), 4),
                "noise_pct": round(noise, 2),
                "patched_noise_pct": round(pnoise, 2),
                "aa_ratio": None if aa is None else round(aa, 4),
                "spread_pct": round(spread, 2),
                "slower_beyond_spread": (pm / bm - 1) * 100 > spread,
                "base_rounds_us": [round(x, 3) for x in b],
                "patched_rounds_us": [round(x, 3) for x in p],
            }
            if also:
                row[mode]["also"] = {
                    label: {
                        "us": round(also_median[label], 3),
                        "speedup": round(bm / also_median[label], 4),
                        "rounds_us": [round(x, 3) for x in t],
                    }
                    for label, t in also.items()
                }


def verdict(result: dict) -> dict:
    rows = result["rows"]
    out: dict = {
        "bar_speedup_graph_n1": {},
        "slower_beyond_spread": [],
        "outputs_ok": True,
    }
    for row in rows:
        if row["config"] in BAR_CONFIGS and row["n"] == 1 and "graph" in row:
            out["bar_speedup_graph_n1"][row["config"]] = row["graph"]["speedup"]
        for mode in ("eager", "graph"):
            if row.get(mode, {}).get("slower_beyond_spread"):
                out["slower_beyond_spread"].append(
                    f"{row['config']} N={row['n']} {mode}: "
                    f"{row[mode]['speedup']:.3f}x (spread {row[mode]['spread_pct']}%)"
                )
        if not row.get("outputs", {}).get("ok", False):
            out["outputs_ok"] = False
    sp = out["bar_speedup_graph_n1"]
    out["bar_met"] = (
        all(sp.get(c, 0) >= BAR_SPEEDUP for c in BAR_CONFIGS)
        and not [s for s in out["slower_beyond_spread"] if " graph:" in s]
        and out["outputs_ok"]
    )
    return out


def format_rows(rows: list[dict]) -> str:
    lines = [
        (
            f"{'config':<16}{'N':>6} | {'eager base':>10} {'patched':>9} {'x':>6} "
            f"{'sprd%':>6} | {'graph base':>10} {'patched':>9} {'x':>6} "
            f"{'min':>6} {'max':>6} {'sprd%':>6} | out"
        )
    ]
    for r in rows:
        e, g = r.get("eager"), r.get("graph")
        if not e or not g:
            continue
        o = r.get("outputs", {})
        lines.append(
            f"{r['config']:<16}{r['n']:>6} | {e['base_us']:>10.1f} "
            f"{e['patched_us']:>9.1f} {e['speedup']:>6.3f} {e['spread_pct']:>6.2f} | "
            f"{g['base_us']:>10.1f} "
            f"{g['patched_us']:>9.1f} {g['speedup']:>6.3f} {g['ratio_min']:>6.3f} "
            f"{g['ratio_max']:>6.3f} {g['spread_pct']:>6.2f} | "
            f"{'ok' if o.get('ok') else 'BAD'} {o.get('rel_l2', float('nan')):.1e}"
        )
        for label, a in g.get("also", {}).items():
            lines.append(
                f"{'':<16}{'':>6}   graph base/{label}: {a['speedup']:.3f} "
                f"({a['us']:.1f} us; rounds {a['rounds_us']})"
            )
    return "\n".join(lines)
