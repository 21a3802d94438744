"""Small records and generations for the tests of ci/bench_e2e.py's parts."""


def record(tree: str, model="a2.7b", mode="graph", **decode) -> dict:
    return {
        "model": model,
        "mode": mode,
        "tree": tree,
        "decode_ms": {k.lstrip("b"): v for k, v in decode.items()},
        "prefill_ms": {},
    }


def gen(tokens, tops):
    """A generation: tokens and, per position, a top-5 dict (str ids)."""
    return {"tokens": tokens, "logprobs": [{str(k): v for k, v in t.items()} for t in tops]}


def forced(lps, ranks):
    return [[{"logprob": lp, "rank": r} for lp, r in zip(lps, ranks, strict=True)]]
