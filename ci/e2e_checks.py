"""Correctness verdicts of ``ci/bench_e2e.py --check``: greedy tokens and
logprobs of base and patched on a real checkpoint, scored against the fp32
reference, each multi-GPU run against the same tree on one GPU, and the
tables that report them (rules in ``judge``). Plain arithmetic on the
recorded outputs, so CI checks it on CPU.
"""

from __future__ import annotations


def check_table(checks: list[dict]) -> str:
    """A Markdown table of the correctness checks."""
    head = (
        "| model | layers | greedy tokens base = patched | max abs Δ top-5 logprob "
        "| mean abs error vs fp32, base / patched | fp32 top-1 agreement, base / patched "
        "| verdict |\n"
        "|---|---:|---|---:|---:|---:|---|\n"
    )
    lines = []
    for c in checks:
        if c.get("error"):
            lines.append(f"| {c['model']} | – | – | – | – | – | error: {c['error']} |")
            continue
        if "ref_error" not in c:  # the first device run's format: no fp32 reference
            same = "identical" if c["tokens_identical"] else f"no (first at {c['first_diff']})"
            lines.append(
                f"| {c['model']} | {c.get('layers', '–')} | {same} "
                f"| {c['max_logprob_diff']:.4f} | – | – | not judged (no fp32 reference) |"
            )
            continue
        tie = f", near tie ≤ {c['tie']:.3f}" if "tie" in c else ""
        same = divergence(c, "largest base margin", tie)
        err = f"{c['ref_error']['base']:.4f} / {c['ref_error']['patched']:.4f}"
        top1 = f"{c['ref_top1']['base']:.3f} / {c['ref_top1']['patched']:.3f}"
        lines.append(
            f"| {c['model']} | {c['layers']} | {same} | {c['max_logprob_diff']:.4f} "
            f"| {err} | {top1} | {'pass' if c['passed'] else 'FAIL'} |"
        )
    return head + "\n".join(lines) + "\n"


def divergence(verdict: dict, margin: str, note: str = "") -> str:
    """How ``compare_generations``' outputs differ, in words for a table."""
    if verdict["tokens_identical"]:
        return "identical"
    worst = max(f["margin"] for f in verdict["flips"])
    flips = len(verdict["flips"])
    return f"{flips} of {verdict['sequences']} diverge ({margin} {worst:.3f}{note})"


def compare_generations(base: list[dict], patched: list[dict], tie: float) -> dict:
    """Free-running greedy outputs of one prompt set on two trees.

    Each list holds, per prompt, ``{"tokens": [...], "logprobs": [{id: lp}]}``
    (top-5 per position). Where the tokens first differ, the context was still
    the same, so a divergence is a near tie when base rated the token patched
    chose within ``tie`` of its own top token. Top-5 logprobs are compared up to
    and including the first differing position (later, the contexts differ).
    """
    flips = []
    max_diff = 0.0
    for i, (b, p) in enumerate(zip(base, patched, strict=True)):
        n = len(b["tokens"])
        for pos in range(n):
            bt, pt = b["tokens"][pos], p["tokens"][pos]
            if bt != pt:
                lps = b["logprobs"][pos]
                margin = lps[str(bt)] - lps.get(str(pt), float("-inf"))
                flips.append({"prompt": i, "pos": pos, "margin": margin})
                n = pos + 1
                break
        for lb, lp in zip(b["logprobs"][:n], p["logprobs"][:n], strict=True):
            for tok in set(lb) & set(lp):
                max_diff = max(max_diff, abs(lb[tok] - lp[tok]))
    return {
        "tokens_identical": not flips,
        "flips": flips,
        "sequences": len(base),
        "near_ties_only": all(f["margin"] <= tie for f in flips),
        "max_logprob_diff": max_diff,
    }


def parallel_table(checks: list[dict], tie: float) -> str:
    """Each tree's multi-GPU check (a model label with " tp2" or " dp2ep")
    against the same tree's one-GPU check of that model, by the same rule as
    base against patched (the one-GPU run in base's place). Empty when there
    is no such pair."""
    single = {c["model"]: c for c in checks if " " not in c["model"] and "outputs" in c}
    rows = []
    for c in checks:
        model, _, setup = c["model"].partition(" ")
        if not setup or model not in single or "outputs" not in c:
            continue
        for tree in ("base", "patched"):
            one, many = single[model]["outputs"][tree], c["outputs"][tree]
            if one.get("error") or many.get("error"):
                continue
            v = compare_generations(
                one["single"] + one["batch"], many["single"] + many["batch"], tie
            )
            same = divergence(v, "largest margin")
            setup_run = many.get("parallel", {})
            backend = setup_run.get("all2all_backend") or "–"
            rows.append(
                f"| {model} | {setup} | {backend} | {tree} | {same} "
                f"| {v['max_logprob_diff']:.4f} | {'yes' if v['near_ties_only'] else 'NO'} |"
            )
    if not rows:
        return ""
    head = (
        "| model | setup | all-to-all | tree | greedy tokens, one GPU vs this setup "
        "| max abs Δ top-5 logprob | near ties only |\n|---|---|---|---|---|---:|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def reference_error(forced: list[list[dict]], ref_logprobs: list[list[float]]) -> tuple:
    """Teacher-forced scores of one tree against the fp32 reference.

    ``forced[i][j]`` is ``{"logprob": lp, "rank": r}`` of the reference's j-th
    generated token of prompt i. Returns (mean |lp - lp_ref|, fraction of
    positions where the tree ranks the reference token first).
    """
    errs, top1 = [], []
    for seq, ref in zip(forced, ref_logprobs, strict=True):
        for got, want in zip(seq, ref, strict=True):
            errs.append(abs(got["logprob"] - want))
            top1.append(got["rank"] == 1)
    return sum(errs) / len(errs), sum(top1) / len(top1)


def judge(model: str, ref: dict, outs: dict, tie: float, slack: float) -> dict:
    """The verdict of one model's check from both trees' outputs.

    Pass: greedy tokens identical or diverging only at near ties, and the
    patched tree no further from the fp32 reference than base (mean error
    at most ``slack`` times base's, plus 0.005).

    A near tie is a base margin within ``tie``, or within base's own mean
    error against fp32 where that is larger: a model whose bf16 logprobs miss
    fp32 by 0.19 on average (Qwen3-Next's gated delta-net at random init) has
    no meaningful preference between two tokens 0.15 apart, on either tree."""
    errors = [f"{t}: {o['error']}" for t, o in outs.items() if o.get("error")]
    if errors:
        return {"model": model, "error": "; ".join(errors)}
    ref_error, ref_top1 = {}, {}
    for tree, out in outs.items():
        ref_error[tree], ref_top1[tree] = reference_error(out["forced"], ref["ref_logprobs"])
    tie = max(tie, ref_error["base"])
    b, p = outs["base"], outs["patched"]
    verdict = compare_generations(b["single"] + b["batch"], p["single"] + p["batch"], tie)
    close = ref_error["patched"] <= slack * ref_error["base"] + 0.005
    return {
        "model": model,
        "layers": ref["layers"],
        **verdict,
        "tie": tie,
        "ref_error": ref_error,
        "ref_top1": ref_top1,
        "passed": verdict["near_ties_only"] and close,
    }
