"""The parts of ci/bench_e2e.py that need no GPU: process order, the summary
and spread arithmetic, the correctness verdicts, the report, the model configs
and the small real checkpoint (made here on CPU with a tiny config)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ci"))

import bench_e2e  # noqa: E402
import e2e_checks  # noqa: E402
import e2e_driver  # noqa: E402
import e2e_models  # noqa: E402
import e2e_report  # noqa: E402


def record(tree: str, model="a2.7b", mode="graph", **decode) -> dict:
    return {
        "model": model,
        "mode": mode,
        "tree": tree,
        "decode_ms": {k.lstrip("b"): v for k, v in decode.items()},
        "prefill_ms": {},
    }


def test_abba_alternates_trees_and_balances_them():
    assert e2e_driver.abba(3) == ["base", "patched", "patched", "base", "base", "patched"]
    order = e2e_driver.abba(4)
    assert order.count("base") == order.count("patched") == 4
    # every adjacent pair of processes holds one of each tree
    assert all({order[i], order[i + 1]} == {"base", "patched"} for i in range(0, 8, 2))


def test_schedule_runs_each_model_and_mode_in_abba_order():
    jobs = e2e_driver.schedule("a2.7b:2,30b-a3b", "graph,eager", procs=1, eager_procs=1)
    assert jobs == [
        ("a2.7b", "graph", 0, "base"),
        ("a2.7b", "graph", 1, "patched"),
        ("a2.7b", "graph", 2, "patched"),
        ("a2.7b", "graph", 3, "base"),
        ("a2.7b", "eager", 0, "base"),
        ("a2.7b", "eager", 1, "patched"),
        ("30b-a3b", "graph", 0, "base"),
        ("30b-a3b", "graph", 1, "patched"),
        ("30b-a3b", "eager", 0, "base"),
        ("30b-a3b", "eager", 1, "patched"),
    ]
    with pytest.raises(SystemExit, match="unknown model 'a2.7'"):
        e2e_driver.schedule("a2.7", "graph", 1, 1)
    # the device command refuses bad names before it unpacks anything
    with pytest.raises(SystemExit, match="--check: next"):
        bench_e2e.main(["device", "--bundle", "/nonexistent", "--out", "/tmp/x", "--check", "next"])


def test_summary_medians_ratio_range_and_spreads():
    records = [
        record("base", b1=[2.0, 2.2, 2.1]),  # process median 2.1
        record("patched", b1=[1.8, 1.9, 1.7]),  # 1.8
        record("patched", b1=[1.6, 1.6, 1.6]),  # 1.6
        record("base", b1=[2.4, 2.3, 2.3]),  # 2.3
        record("base", b1=[2.2]),  # 2.2
        record("patched", b1=[1.7]),  # 1.7
        {**record("base", b1=[9.9]), "error": "crashed"},  # ignored
    ]
    (row,) = e2e_report.summarize(records)
    assert row["base"] == [2.1, 2.3, 2.2] and row["patched"] == [1.8, 1.6, 1.7]
    assert row["base_median"] == pytest.approx(2.2)
    assert row["patched_median"] == pytest.approx(1.7)
    assert row["ratio"] == pytest.approx(1.7 / 2.2)
    assert row["ratio_lo"] == pytest.approx(1.6 / 2.3)
    assert row["ratio_hi"] == pytest.approx(1.8 / 2.1)
    assert row["base_spread"] == pytest.approx((2.3 - 2.1) / 2.2)
    assert row["base_vs_base"] == pytest.approx(2.3 / 2.1 - 1)
    assert row["patched_vs_patched"] == pytest.approx(1.8 / 1.6 - 1)
    assert row["verdict"] == "faster"


def test_noise_band_is_the_larger_of_the_two_trees_own_spreads():
    # Base processes agree within 1 %, patched ones differ by 20 %: a median
    # 5 % slower is inside what patched shows against itself.
    records = [record("base", b1=[1.00]), record("base", b1=[1.01])]
    records += [record("patched", b1=[0.95]), record("patched", b1=[1.14])]
    (row,) = e2e_report.summarize(records)
    assert row["ratio"] == pytest.approx(1.045 / 1.005)
    assert e2e_report.noise_band(row) == pytest.approx(1.14 / 0.95 - 1)
    assert row["verdict"] == "neutral"
    # ... while the same medians with quiet processes on both trees are slower.
    records = [record("base", b1=[1.00]), record("base", b1=[1.01])]
    records += [record("patched", b1=[1.04]), record("patched", b1=[1.05])]
    (row,) = e2e_report.summarize(records)
    assert row["verdict"] == "slower"
    assert "| 1.0 % / 1.0 % | slower |" in e2e_report.table([row])


def test_summary_orders_batches_numerically_and_keeps_models_apart():
    records = [
        record(t, model=m, b16=[1.0], b2=[1.0], b1=[1.0])
        for m in ("a2.7b", "30b-a3b")
        for t in ("base", "patched")
    ]
    rows = e2e_report.summarize(records)
    assert [(r["model"], r["key"]) for r in rows] == [
        ("30b-a3b", "1"),
        ("30b-a3b", "2"),
        ("30b-a3b", "16"),
        ("a2.7b", "1"),
        ("a2.7b", "2"),
        ("a2.7b", "16"),
    ]
    # one process per tree: no band, so no verdict but "unknown"
    assert {r["verdict"] for r in rows} == {"unknown"}


@pytest.mark.parametrize(
    "ratio, band, want",
    [(0.95, 0.02, "faster"), (0.99, 0.02, "neutral"), (1.01, 0.02, "neutral"),
     (1.03, 0.02, "slower"), (0.5, None, "unknown")],
)  # fmt: skip
def test_verdict_uses_the_noise_band(ratio, band, want):
    assert e2e_report.verdict(ratio, band) == want


def test_incomplete_row_when_one_tree_is_missing():
    (row,) = e2e_report.summarize([record("base", b1=[1.0]), record("base", b1=[1.1])])
    assert row["ratio"] is None and row["verdict"] == "incomplete"
    assert "| – |" in e2e_report.table([row])


def gen(tokens, tops):
    """A generation: tokens and, per position, a top-5 dict (str ids)."""
    return {"tokens": tokens, "logprobs": [{str(k): v for k, v in t.items()} for t in tops]}


def test_identical_generations_report_the_largest_logprob_difference():
    b = [gen([5, 6], [{5: -1.0, 7: -2.0}, {6: -0.5}])]
    p = [gen([5, 6], [{5: -1.03, 7: -2.0}, {6: -0.45}])]
    v = e2e_checks.compare_generations(b, p, tie=0.1)
    assert v["tokens_identical"] and v["near_ties_only"]
    assert v["max_logprob_diff"] == pytest.approx(0.05)


def test_divergence_at_a_near_tie_passes_and_a_real_one_does_not():
    base = [gen([5, 6, 1], [{5: -1.0}, {6: -2.00, 9: -2.05}, {1: -1.0}])]
    tie = [gen([5, 9, 4], [{5: -1.0}, {9: -2.01, 6: -2.02}, {4: -9.0}])]
    v = e2e_checks.compare_generations(base, tie, tie=0.1)
    assert not v["tokens_identical"] and v["near_ties_only"]
    assert v["flips"] == [{"prompt": 0, "pos": 1, "margin": pytest.approx(0.05)}]
    # positions after the divergence (different contexts) are not compared
    assert v["max_logprob_diff"] == pytest.approx(0.04)
    sure = [gen([5, 6, 1], [{5: -1.0}, {6: -1.0, 9: -3.0}, {1: -1.0}])]  # base: 6 by 2.0
    v = e2e_checks.compare_generations(sure, tie, tie=0.1)
    assert not v["near_ties_only"] and v["flips"][0]["margin"] == pytest.approx(2.0)
    missing = [gen([5, 3, 4], [{5: -1.0}, {3: -1.0}, {4: -1.0}])]  # not in base's top 5
    v = e2e_checks.compare_generations(base, missing, tie=0.1)
    assert math.isinf(v["flips"][0]["margin"]) and not v["near_ties_only"]


def forced(lps, ranks):
    return [[{"logprob": lp, "rank": r} for lp, r in zip(lps, ranks, strict=True)]]


def test_reference_error_and_top1_agreement():
    err, top1 = e2e_checks.reference_error(forced([-1.0, -2.0], [1, 2]), [[-1.1, -2.3]])
    assert err == pytest.approx(0.2) and top1 == 0.5


def test_judge_compares_patched_with_base_against_the_reference():
    same = gen([5], [{5: -1.0}])
    ref = {"layers": 4, "ref_logprobs": [[-1.0, -1.0]]}

    def outs(base_lp, patched_lp):
        return {
            "base": {"single": [same], "batch": [], "forced": forced(base_lp, [1, 1])},
            "patched": {"single": [same], "batch": [], "forced": forced(patched_lp, [1, 1])},
        }

    ok = e2e_checks.judge("a2.7b", ref, outs([-1.1, -1.1], [-1.05, -1.12]), 0.1, 1.25)
    assert ok["passed"] and ok["ref_error"]["base"] == pytest.approx(0.1)
    worse = e2e_checks.judge("a2.7b", ref, outs([-1.1, -1.1], [-1.3, -1.3]), 0.1, 1.25)
    assert not worse["passed"]
    err = e2e_checks.judge("a2.7b", ref, {"base": {"error": "boom"}, "patched": {}}, 0.1, 1.25)
    assert err == {"model": "a2.7b", "error": "base: boom"}
    first_format = {"model": "a2.7b", "tokens_identical": True, "max_logprob_diff": 0.0}
    table = e2e_checks.check_table([ok, worse, err, first_format])
    assert "| pass |" in table and "| FAIL |" in table and "error: base: boom" in table
    assert "not judged (no fp32 reference)" in table


def test_report_writes_markdown_json_and_plot(tmp_path):
    raw = {
        "records": [
            record(t, b1=[1.0 + i / 100], b8=[2.0]) for i, t in enumerate(e2e_driver.abba(2))
        ],
        "checks": [
            {
                "model": "a2.7b",
                "error": "patched: process exited 1 without a result",
                "ref": {"ref_logprobs": [[-0.5]]},
                "outputs": {"base": {"single": []}, "patched": {"error": "exited 1"}},
            }
        ],
        "bundle": {"head_rev": "x"},
        "versions": {"device": "test"},
    }
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    md, js, png = tmp_path / "e.md", tmp_path / "e.json", tmp_path / "e.png"
    assert (
        bench_e2e.main(["report", str(path), "--md", str(md), "--json", str(js), "--png", str(png)])
        == 0
    )
    assert "| a2.7b | graph | decode ms/token | 8 |" in md.read_text()
    summary = json.loads(js.read_text())
    assert [r["key"] for r in summary["rows"]] == ["1", "8"]
    assert summary["runs"][0]["versions"] == {"device": "test"}
    # the summary keeps each check's verdict, not its per-token data
    assert summary["checks"] == [
        {"model": "a2.7b", "error": "patched: process exited 1 without a result"}
    ]
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("top,expected", [(None, 15), (3, 3)])
def test_report_profile_top_sets_the_kernels_per_table(tmp_path, top, expected):
    kernels = {f"kernel_{i:02d}": {"count": 24, "us": 10.0 + i} for i in range(20)}
    prof = {"step": "decode batch 1, per step", "wall_ms": 1.0, "kernels": kernels}
    records = [{**record(t, b1=[1.0]), "profile": prof} for t in ("base", "patched")]
    raw = {"records": records, "checks": []}
    path, md = tmp_path / "raw.json", tmp_path / "e.md"
    path.write_text(json.dumps(raw))
    args = ["report", str(path), "--md", str(md)]
    args += [] if top is None else ["--profile-top", str(top)]
    assert bench_e2e.main(args) == 0
    listed = [line for line in md.read_text().splitlines() if line.startswith("| `kernel_")]
    assert len(listed) == expected


@pytest.mark.parametrize("name", list(e2e_models.MODELS))
def test_model_configs_match_the_published_dimensions(name, tmp_path):
    spec = e2e_models.MODELS[name]
    e2e_models.write_config(name, 8, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    assert cfg["architectures"] == spec["config"]["architectures"]
    loaded = e2e_models.hf_config(name, 8)
    assert loaded.num_experts == spec["config"]["num_experts"]
    assert loaded.moe_intermediate_size == spec["config"]["moe_intermediate_size"]
    assert spec["layers"] <= spec["full_layers"]
    if name == "next80b":  # three linear-attention layers, then one full
        assert loaded.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]


def test_checkpoint_has_per_expert_weights_and_a_consistent_reference(tmp_path, monkeypatch):
    tiny = {
        "title": "tiny",
        "layers": 2,
        "full_layers": 2,
        "check_layers": 2,
        "config": {
            **e2e_models.MODELS["a2.7b"]["config"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 256,
        },
    }
    monkeypatch.setitem(e2e_models.MODELS, "tiny", tiny)
    ref = e2e_models.make_checkpoint("tiny", tmp_path, [[1, 2, 3], [4, 5]], 6, seed=1)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.experts.0.gate_proj.weight").dtype.is_floating_point
    # vLLM's qwen2_moe loader maps per-expert gate/up/down weights
    assert {f"model.layers.1.mlp.experts.3.{w}_proj.weight" for w in ("gate", "up", "down")} <= keys
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
    assert [len(t) for t in ref["ref_tokens"]] == [6, 6]
    # greedy tokens are the argmax, so each has the highest log-probability:
    # it is at least log(1/vocab) and never positive
    for lps in ref["ref_logprobs"]:
        assert all(math.log(1 / 256) - 1e-4 <= lp <= 0 for lp in lps)
    assert json.loads((tmp_path / "moepatch-checkpoint.json").read_text())["layers"] == 2


def test_profile_table_orders_kernels_by_difference_and_keeps_the_totals():
    def prof(tree, gate_us, wall_ms):
        kernels = {
            "fused_moe_kernel": {"count": 48, "us": 900.0},
            "gate": {"count": 24, "us": gate_us},
        }
        return {
            **record(tree),
            "profile": {"step": "prefill 1x2048", "wall_ms": wall_ms, "kernels": kernels},
        }

    records = [prof("base", 10.0, 30.0), prof("base", 14.0, 34.0), prof("patched", 500.0, 50.0)]
    table = e2e_report.profile_table(records)
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    # the totals first, then the kernel that differs most
    assert lines[0].startswith("| `(all kernels)` | 912.0 | 1400.0 | +488.0 |")
    assert lines[1].startswith("| `(wall)` | 32000.0 | 50000.0 | +18000.0 |")
    assert lines[2] == "| `gate` | 12.0 | 500.0 | +488.0 |"
    assert lines[3] == "| `fused_moe_kernel` | 900.0 | 900.0 | +0.0 |"
    assert "a2.7b graph, prefill 1x2048" in table


def test_profile_table_has_a_host_section_ordered_by_difference():
    def prof(tree, malloc_us):
        host = {"cudaLaunchKernel": {"count": 900, "us": 4000.0}}
        if malloc_us:
            host["cudaMalloc"] = {"count": 3, "us": malloc_us}
        kernels = {"fused_moe_kernel": {"count": 48, "us": 900.0}}
        return {
            **record(tree),
            "profile": {
                "step": "prefill 1x2048",
                "wall_ms": 30.0,
                "kernels": kernels,
                "host": host,
            },
        }

    table = e2e_report.profile_table([prof("base", 0), prof("patched", 15000.0)])
    host = table[table.index("host µs per event") :]
    lines = [line for line in host.splitlines() if line.startswith("| `")]
    # no totals in the host section; an event one tree lacks counts as 0 µs
    assert lines == [
        "| `cudaMalloc` | 0.0 | 15000.0 | +15000.0 |",
        "| `cudaLaunchKernel` | 4000.0 | 4000.0 | +0.0 |",
    ]


def test_profile_decode_is_the_prompt_plus_steps_less_the_prompt_per_step(monkeypatch):
    import e2e_engine

    def fake_profile(step):
        tokens = step()  # the fake ``timed`` returns its token count
        decode = tokens - 1
        kernels = {"prompt_attention": {"count": 24, "us": 300.0}}
        if decode:
            kernels["fused_moe_kernel"] = {"count": 48 * decode, "us": 60.0 * decode}
        host = {"cudaGraphLaunch": {"count": decode, "us": 5.0 * decode}}
        # the prompt alone runs one stream; decode adds the shared experts' side stream
        timeline = {
            "span_us": 400.0 + 2400.0 * decode,
            "busy_us": 300.0 + 2000.0 * decode,
            "overlap_us": 700.0 * decode,
            "idle_us": 100.0 + 400.0 * decode,
            "streams_us": [300.0 + 1900.0 * decode] + ([800.0 * decode] if decode else []),
        }
        return {
            "wall_ms": 1.0 + 2.5 * decode,
            "kernels": kernels,
            "host": host,
            "timeline": timeline,
        }

    monkeypatch.setattr(e2e_engine, "profile_step", fake_profile)
    prof = e2e_engine.profile_decode(lambda ps, n: n, [], 8)
    assert prof["step"] == "decode batch 8, per step"
    assert prof["wall_ms"] == pytest.approx(2.5)
    # the prompt's kernel cancels; the decode kernel is per step
    assert prof["kernels"] == {"fused_moe_kernel": {"count": 48.0, "us": 60.0}}
    assert prof["host"] == {"cudaGraphLaunch": {"count": 1.0, "us": 5.0}}
    assert prof["timeline"] == {
        "span_us": pytest.approx(2400.0),
        "busy_us": pytest.approx(2000.0),
        "overlap_us": pytest.approx(700.0),
        "idle_us": pytest.approx(400.0),
        # a stream the prompt's profile lacks is subtracted as 0
        "streams_us": [pytest.approx(1900.0), pytest.approx(800.0)],
    }


def test_gpu_timeline_counts_overlap_once_and_gaps_as_idle():
    import e2e_engine

    # main stream 7: [0, 10], [12, 20], [30, 35]; side stream 9: [5, 15]
    intervals = [(7, 0.0, 10.0), (9, 5.0, 15.0), (7, 12.0, 20.0), (7, 30.0, 35.0)]
    timeline = e2e_engine.gpu_timeline(intervals)
    assert timeline == {
        "span_us": 35.0,
        "busy_us": 25.0,  # [0, 20] and [30, 35]
        "overlap_us": 8.0,  # [5, 10] and [12, 15]
        "idle_us": 10.0,  # [20, 30]
        "streams_us": [23.0, 10.0],
    }
    # order of the activities does not matter
    assert e2e_engine.gpu_timeline(intervals[::-1]) == timeline
    # an activity inside another adds nothing to the busy time
    assert e2e_engine.gpu_timeline([(7, 0.0, 10.0), (9, 2.0, 3.0)])["busy_us"] == 10.0
    assert e2e_engine.gpu_timeline([]) == {
        "span_us": 0.0,
        "busy_us": 0.0,
        "overlap_us": 0.0,
        "idle_us": 0.0,
        "streams_us": [],
    }


def test_profile_table_has_a_section_per_decode_batch_after_the_prefill():
    def prof(tree, us):
        step = {"wall_ms": 2.0, "kernels": {"fused_moe_kernel": {"count": 48, "us": us}}}
        return {
            **record(tree),
            "profile": {**step, "step": "prefill 1x2048"},
            "decode_profiles": {
                "8": {**step, "step": "decode batch 8, per step"},
                "1": {**step, "step": "decode batch 1, per step"},
            },
        }

    table = e2e_report.profile_table([prof("base", 40.0), prof("patched", 30.0)])
    heads = [line for line in table.splitlines() if line.startswith("a2.7b graph")]
    assert [h.split(": ")[0] for h in heads] == [
        "a2.7b graph, decode batch 1, per step",
        "a2.7b graph, decode batch 8, per step",
        "a2.7b graph, prefill 1x2048",
    ]
    assert "| `fused_moe_kernel` | 40.0 | 30.0 | -10.0 |" in table
    # raw files recorded before the timeline existed have no timeline rows
    assert "(GPU busy" not in table


def test_profile_table_lists_the_timeline_after_the_totals():
    def prof(tree, idle):
        timeline = {
            "span_us": 2000.0,
            "busy_us": 2000.0 - idle,
            "overlap_us": 500.0,
            "idle_us": idle,
            "streams_us": [1500.0, 1000.0 - idle],
        }
        step = {"wall_ms": 2.0, "kernels": {"k": {"count": 1, "us": 1.0}}, "timeline": timeline}
        return {**record(tree), "decode_profiles": {"1": {**step, "step": "decode batch 1"}}}

    table = e2e_report.profile_table([prof("base", 300.0), prof("patched", 100.0)])
    rows = [line for line in table.splitlines() if line.startswith("| `(")]
    assert rows == [
        "| `(all kernels)` | 1.0 | 1.0 | +0.0 |",
        "| `(wall)` | 2000.0 | 2000.0 | +0.0 |",
        "| `(GPU busy: any stream)` | 1700.0 | 1900.0 | +200.0 |",
        "| `(GPU busy: two or more streams)` | 500.0 | 500.0 | +0.0 |",
        "| `(GPU idle within the span)` | 300.0 | 100.0 | -200.0 |",
        "| `(busiest stream)` | 1500.0 | 1500.0 | +0.0 |",
        "| `(second stream)` | 700.0 | 900.0 | +200.0 |",
    ]


def test_allocator_table_lists_each_process_and_prefill_shape_in_order():
    def rec(tree, seq, allocs):
        counts = {"num_device_alloc": allocs, "num_device_free": allocs, "num_alloc_retries": 0}
        return {**record(tree), "seq": seq, "prefill_allocator": {"4x2048": {}, "1x2048": counts}}

    table = e2e_report.allocator_table([rec("patched", 1, 7), rec("base", 0, 0)])
    rows = [line for line in table.splitlines() if line.startswith("| a2.7b")]
    assert rows == [
        "| a2.7b | graph | 1x2048 | base | 0 | 0 | 0 |",
        "| a2.7b | graph | 4x2048 | base | 0 | 0 | 0 |",
        "| a2.7b | graph | 1x2048 | patched | 7 | 7 | 0 |",
        "| a2.7b | graph | 4x2048 | patched | 0 | 0 | 0 |",
    ]
    assert e2e_report.allocator_table([record("base")]) == ""


def test_near_tie_widens_to_base_error_against_fp32():
    # Base and patched pick different tokens at position 0, base margin 0.15.
    base = gen([5], [{5: -1.0, 9: -1.15}])
    patched = gen([9], [{9: -1.0, 5: -1.15}])
    ref = {"layers": 4, "ref_logprobs": [[-1.0, -1.0]]}

    def check(base_err, patched_err):
        outs = {
            "base": {"single": [base], "batch": [], "forced": forced(base_err, [1, 1])},
            "patched": {"single": [patched], "batch": [], "forced": forced(patched_err, [1, 1])},
        }
        return e2e_checks.judge("next80b", ref, outs, 0.1, 1.25)

    # bf16 base misses fp32 by 0.02: a 0.15 margin is a real preference.
    precise = check([-1.02, -0.98], [-1.02, -0.98])
    assert precise["tie"] == 0.1 and not precise["passed"]
    # bf16 base misses fp32 by 0.2 on average: 0.15 is inside its own noise.
    noisy = check([-1.2, -0.8], [-1.2, -0.8])
    assert noisy["tie"] == pytest.approx(0.2) and noisy["passed"]
    assert "near tie ≤ 0.200" in e2e_checks.check_table([noisy])
    # ... but patched must still be no further from fp32 than base.
    assert not check([-1.2, -0.8], [-1.5, -0.5])["passed"]


def test_report_rejudges_stored_checks(tmp_path):
    ref = {"layers": 4, "ref_logprobs": [[-1.0]]}
    outs = {
        t: {"single": [gen([5], [{5: -1.0, 9: -1.15}])], "batch": [], "forced": forced([-1.2], [1])}
        for t in ("base", "patched")
    }
    outs["patched"]["single"] = [gen([9], [{9: -1.0, 5: -1.15}])]
    stale = {"model": "next80b", "passed": False, "ref": ref, "outputs": outs}
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"records": [], "checks": [stale]}))
    out = tmp_path / "s.json"
    assert bench_e2e.main(["report", str(raw), "--json", str(out)]) == 0
    (check,) = json.loads(out.read_text())["checks"]
    assert check["passed"] and check["tie"] == pytest.approx(0.2) and "outputs" not in check


def test_candidate_patch_applies_to_the_patched_tree_or_stops(tmp_path):
    tree = tmp_path / "patched"
    tree.mkdir()
    (tree / "a.py").write_text("x = 1\n")
    good = tmp_path / "good.patch"
    good.write_text(
        "diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    )
    rec = e2e_driver.apply_candidate(good, tree)
    assert (tree / "a.py").read_text() == "x = 2\n"
    assert rec["patch"] == "good.patch" and len(rec["sha256"]) == 64
    # The same patch no longer applies: a clear stop naming it, tree unchanged.
    with pytest.raises(SystemExit, match="good.patch does not apply"):
        e2e_driver.apply_candidate(good, tree)
    assert (tree / "a.py").read_text() == "x = 2\n"
    raws = [{"applied": [rec]}, {"applied": [rec]}, {}]
    assert (
        bench_e2e.candidates(raws)
        == f"patched = the series + candidate good.patch ({rec['sha256'][:12]})\n\n"
    )
    assert bench_e2e.candidates([{}]) == ""


def test_device_stops_on_a_missing_candidate_before_unpacking(tmp_path):
    with pytest.raises(SystemExit, match="no candidate patch at"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--apply", "nope.patch"]
        )


def test_parallel_labels_and_rank_environment():
    assert e2e_driver.parallel_label(1, 1) == ""
    assert e2e_driver.parallel_label(2, 1) == " tp2"
    assert e2e_driver.parallel_label(1, 2) == " dp2ep"
    assert e2e_driver.parallel_label(2, 2) == " tp2 dp2ep"
    env = e2e_driver.rank_env(1, 2, 29500)
    assert env["VLLM_DP_RANK"] == env["VLLM_DP_RANK_LOCAL"] == "1"
    assert env["VLLM_DP_SIZE"] == "2" and env["VLLM_DP_MASTER_PORT"] == "29500"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def _driver(tmp_path, dp, rank_script):
    """A Driver without a bundle whose processes run ``rank_script``."""
    import argparse
    import subprocess

    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(dp=dp, budget=60)
    d.t0 = __import__("time").monotonic()
    d.envs = []

    def spawn(tree, cmd, extra_env=None):
        d.envs.append(extra_env or {})
        env = dict(__import__("os").environ, **(extra_env or {}))
        return subprocess.Popen([sys.executable, "-c", rank_script, cmd[-1]], env=env)

    d.spawn = spawn
    return d


def test_data_parallel_measurement_starts_one_process_per_rank(tmp_path):
    script = (
        "import json, os, sys\n"
        "rank = os.environ.get('VLLM_DP_RANK', '0')\n"
        "json.dump({'rank': rank, 'port': os.environ.get('VLLM_DP_MASTER_PORT')},"
        " open(sys.argv[1], 'w'))\n"
    )
    d = _driver(tmp_path, 2, script)
    started = d.start("base", ["child"], tmp_path / "time-0.json")
    assert [path.name for _, path in started] == ["time-0-rank0.json", "time-0-rank1.json"]
    rec = d.collect(started)
    assert rec["rank"] == "0" and "error" not in rec
    # both ranks share one master port
    assert d.envs[0]["VLLM_DP_MASTER_PORT"] == d.envs[1]["VLLM_DP_MASTER_PORT"] == rec["port"]
    one = _driver(tmp_path, 1, script)
    (only,) = one.start("base", ["child"], tmp_path / "time-1.json")
    assert only[1].name == "time-1.json" and one.envs == [{}]
    assert one.collect([only])["rank"] == "0"


def test_a_failed_rank_fails_the_measurement(tmp_path):
    script = (
        "import json, os, sys\n"
        "if os.environ['VLLM_DP_RANK'] == '1': sys.exit(3)\n"
        "json.dump({'rank': 0}, open(sys.argv[1], 'w'))\n"
    )
    d = _driver(tmp_path, 2, script)
    rec = d.collect(d.start("patched", ["child"], tmp_path / "check.json"))
    assert rec["error"] == "rank 1: process exited 3 without a result"


def test_device_refuses_profile_with_data_parallel(tmp_path):
    with pytest.raises(SystemExit, match="--profile needs one engine process"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--dp", "2", "--profile"]
        )


def test_parallel_table_compares_each_tree_with_its_one_gpu_run():
    def outs(base_tokens, patched_tokens, backend=None):
        def one(tokens):
            return {
                "single": [gen(tokens, [{t: -1.0, 9: -1.02} for t in tokens])],
                "batch": [],
                "parallel": {"all2all_backend": backend},
            }

        return {"base": one(base_tokens), "patched": one(patched_tokens)}

    checks = [
        {"model": "a2.7b", "outputs": outs([5, 6], [5, 6])},
        {"model": "a2.7b dp2ep", "outputs": outs([5, 6], [9, 6], "allgather_reducescatter")},
        {"model": "30b-a3b tp2", "outputs": outs([1], [1])},  # no one-GPU check: no row
    ]
    table = e2e_checks.parallel_table(checks, tie=0.1)
    assert "| a2.7b | dp2ep | allgather_reducescatter | base | identical | 0.0000 | yes |" in table
    assert "| a2.7b | dp2ep | allgather_reducescatter | patched | 1 of 1 diverge" in table
    assert "30b-a3b" not in table
    assert e2e_checks.parallel_table(checks[:1], tie=0.1) == ""


@pytest.mark.parametrize(
    "left,need,opens_pair,expected",
    [(100, 50, True, True), (99, 50, True, False), (50, 50, False, True), (49, 50, False, False)],
)
def test_a_process_that_opens_a_pair_needs_time_for_both(left, need, opens_pair, expected):
    assert e2e_driver.fits_budget(left, need, opens_pair) is expected


@pytest.mark.parametrize(
    "budget,trees",
    [
        (200, ["base", "patched", "patched", "base"]),
        (100, ["base", "patched"]),  # the second pair would not finish
        (90, []),  # not even one pair: nothing runs, rather than base alone
    ],
)
def test_time_models_starts_no_process_it_cannot_pair(tmp_path, monkeypatch, budget, trees):
    import argparse

    clock = [0.0]
    monkeypatch.setattr(e2e_driver.time, "monotonic", lambda: clock[0])
    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(
        models="a2.7b:2", modes="graph", procs=2, eager_procs=0, budget=budget,
        first_estimate=50, batches="1", eager_batches="1", reps=1, prefill_reps=1,
        profile=False, tp=1, dp=1,
    )  # fmt: skip
    d.t0, d.work, d.out, d.durations = 0.0, tmp_path, tmp_path, {}
    d.raw = {"records": [], "skipped": []}
    monkeypatch.setattr(e2e_models, "write_config", lambda *a: None)
    d.start = lambda tree, cmd, res: tree

    def collect(tree):
        clock[0] += 40  # every process takes 40 s
        return {}

    d.collect = collect
    d.time_models()
    assert [r["tree"] for r in d.raw["records"]] == trees
    assert len(d.raw["skipped"]) == 4 - len(trees)


def test_report_compares_multi_gpu_checks_with_one_gpu_raw_files(tmp_path):
    def outs(tokens, backend=None):
        one = {
            "single": [gen(tokens, [{t: -1.0, 9: -1.5} for t in tokens])],
            "batch": [],
            "forced": forced([-1.0], [1]),
            "parallel": {"all2all_backend": backend},
        }
        return {"base": one, "patched": one}

    ref = {"layers": 4, "ref_logprobs": [[-1.0]]}
    single = {"model": "a2.7b", "ref": ref, "outputs": outs([5])}
    one_gpu = tmp_path / "one.json"
    one_gpu.write_text(json.dumps({"records": [record("base", b1=2.0)], "checks": [single]}))
    multi = tmp_path / "multi.json"
    dp = {"model": "a2.7b dp2ep", "ref": ref, "outputs": outs([5], "allgather_reducescatter")}
    multi.write_text(json.dumps({"records": [], "checks": [dp]}))
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    args = ["report", str(multi), "--md", str(md), "--json", str(js)]
    assert bench_e2e.main(args) == 0
    assert "one GPU vs this setup" not in md.read_text()
    assert bench_e2e.main([*args, "--one-gpu", str(one_gpu)]) == 0
    text = md.read_text()
    assert "| a2.7b | dp2ep | allgather_reducescatter | base | identical |" in text
    # only the comparison uses the one-GPU file: its check and timing are not reported
    assert "| a2.7b | 4 |" not in text and "| a2.7b | graph |" not in text
    assert json.loads(js.read_text())["one_gpu_checks_from"] == [str(one_gpu)]


def test_spawn_gives_a_rank_its_environment_over_the_engine_defaults(tmp_path, monkeypatch):
    """A data-parallel rank overrides VLLM_ENABLE_V1_MULTIPROCESSING, which the
    engine defaults also set; both must reach the child, the rank's winning.
    Each tree gets its own vLLM cache."""
    import argparse

    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = ('VLLM_ENABLE_V1_MULTIPROCESSING', 'VLLM_DP_RANK', 'NCCL_NVLS_ENABLE',"
        " 'PYTHONPATH', 'VLLM_CACHE_ROOT')\n"
        "json.dump({k: os.environ.get(k) for k in keys}, open(sys.argv[-1], 'w'))\n"
    )
    monkeypatch.setattr(e2e_driver, "CHILD_SCRIPT", script)
    d = object.__new__(e2e_driver.Driver)
    d.args = argparse.Namespace(dp=2, budget=60)
    d.out, d.work, d.site = tmp_path, tmp_path, tmp_path / "site"
    d.trees = {"base": tmp_path / "base"}
    d.t0 = __import__("time").monotonic()
    rec = d.collect(d.start("base", [], tmp_path / "env.json"))
    assert rec["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and rec["VLLM_DP_RANK"] == "0"
    assert rec["NCCL_NVLS_ENABLE"] == "0"
    assert rec["PYTHONPATH"].split(":") == [str(tmp_path / "base"), str(tmp_path / "site")]
    assert json.loads((tmp_path / "env-rank1.json").read_text())["VLLM_DP_RANK"] == "1"
    # each tree its own vLLM cache (the trees' model modules hash differently)
    d.trees["patched"] = tmp_path / "patched"
    other = d.collect(d.start("patched", [], tmp_path / "env2.json"))
    assert rec["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache" / "base")
    assert other["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache" / "patched")


@pytest.mark.parametrize("suspend,fixed", [(False, True), (True, False)])
def test_nccl_loader_fix_only_where_the_library_lacks_suspend(monkeypatch, suspend, fixed):
    import device_harness

    calls = []
    monkeypatch.setattr(
        device_harness, "nccl_library", lambda: {"version": "2.28.9", "suspend": suspend}
    )
    monkeypatch.setattr(device_harness, "skip_missing_nccl_suspend", calls.append)
    info = e2e_driver.nccl_for_all_to_all([Path("base"), Path("patched")])
    assert info["suspend_skipped"] is fixed
    assert calls == ([[Path("base"), Path("patched")]] if fixed else [])


def test_nccl_loader_fix_refuses_a_loader_it_does_not_know(tmp_path):
    import device_harness

    path = tmp_path / device_harness.NCCL_WRAPPER
    path.parent.mkdir(parents=True)
    path.write_text("class NCCLLibrary:\n    pass\n")
    with pytest.raises(RuntimeError, match="pynccl_wrapper.py: ncclCommSuspend branch not as"):
        device_harness.skip_missing_nccl_suspend([tmp_path])
    assert path.read_text() == "class NCCLLibrary:\n    pass\n"


def test_against_series_needs_a_candidate(tmp_path):
    with pytest.raises(SystemExit, match="--against series needs a candidate"):
        bench_e2e.main(
            ["device", "--bundle", str(tmp_path), "--out", str(tmp_path), "--against", "series"]
        )


def test_against_series_measures_the_candidate_on_top_of_the_series(tmp_path, monkeypatch):
    """base becomes a copy of the patched tree taken before the candidate applies."""
    import device_harness

    release, series = tmp_path / "u" / "base", tmp_path / "u" / "patched"
    for tree, text in ((release, "release\n"), (series, "series\n")):
        tree.mkdir(parents=True)
        (tree / "f.txt").write_text(text)
    monkeypatch.setattr(
        device_harness, "unpack_bundle", lambda bundle, work: (release, series, tmp_path, {})
    )
    monkeypatch.setattr(device_harness, "versions", dict)
    candidate = tmp_path / "c.patch"
    candidate.write_text("--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-series\n+series + candidate\n")
    import argparse

    ns = argparse.Namespace(
        bundle=str(tmp_path),
        out=str(tmp_path / "out"),
        apply=[str(candidate)],
        dp=1,
        against="series",
    )
    d = e2e_driver.Driver(ns)
    assert (d.trees["base"] / "f.txt").read_text() == "series\n"
    assert (d.trees["patched"] / "f.txt").read_text() == "series + candidate\n"
    assert d.raw["against"] == "series"
    (series / "f.txt").write_text("series\n")  # unpacked afresh, as on the device
    ns.against = "release"
    d = e2e_driver.Driver(ns)
    assert (d.trees["base"] / "f.txt").read_text() == "release\n"
    assert (d.trees["patched"] / "f.txt").read_text() == "series + candidate\n"


def test_report_names_the_base_and_refuses_to_mix_bases(tmp_path):
    applied = [{"patch": "c.patch", "sha256": "ab" * 32}]
    series = {"records": [], "checks": [], "against": "series", "applied": applied}
    assert bench_e2e.candidates([series]).startswith(
        "base = the series, patched = the series + candidate c.patch (abababababab)"
    )
    release = {"records": [], "checks": [], "applied": applied}
    assert bench_e2e.candidates([release]).startswith("patched = the series + candidate")
    paths = []
    for name, raw in (("s.json", series), ("r.json", release)):
        (tmp_path / name).write_text(json.dumps(raw))
        paths.append(str(tmp_path / name))
    with pytest.raises(SystemExit, match="compare against different bases"):
        bench_e2e.main(["report", *paths])
    assert bench_e2e.main(["report", paths[0]]) == 0
