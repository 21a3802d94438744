"""The parts of ci/bench_e2e.py that need no GPU, besides the driver and the
checks (test_e2e_driver.py, test_e2e_checks.py): the summary and spread
arithmetic, the profile and report tables, the model configs and the small
real checkpoint (made here on CPU with a tiny config)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ci"))

import bench_e2e  # noqa: E402
import e2e_driver  # noqa: E402
import e2e_models  # noqa: E402
import e2e_report  # noqa: E402
from e2e_fixtures import forced, gen, record  # noqa: E402


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
    # raw files from before the time beside other kernels was recorded: "–"
    assert lines[2] == "| `gate` | 12.0 | 500.0 | +488.0 | – / – |"
    assert lines[3] == "| `fused_moe_kernel` | 900.0 | 900.0 | +0.0 | – / – |"
    assert "a2.7b graph, prefill 1x2048" in table


def test_profile_table_shows_each_kernels_time_beside_another_kernel():
    def prof(tree, align_beside_us):
        kernels = {
            "moe_align": {"count": 24, "us": 200.0, "beside_us": align_beside_us},
            "shared_gemm": {"count": 24, "us": 400.0, "beside_us": 150.0},
        }
        if tree == "patched":
            kernels["router_gemm"] = {"count": 24, "us": 90.0, "beside_us": 0.0}
        step = {"step": "decode batch 32, per step", "wall_ms": 1.0, "kernels": kernels}
        return {**record(tree), "profile": step}

    records = [prof("base", 10.0), prof("base", 30.0), prof("patched", 120.0)]
    table = e2e_report.profile_table(records)
    assert "| kernel | base µs | patched µs | patched − base | beside other GPU work" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines()}
    # the median over a tree's processes; a kernel a tree did not run: "–"
    assert lines["| `moe_align`"].endswith("| 20.0 / 120.0 |")
    assert lines["| `shared_gemm`"].endswith("| 150.0 / 150.0 |")
    assert lines["| `router_gemm`"].endswith("| – / 0.0 |")
    # the totals have no such time
    assert lines["| `(all kernels)`"].endswith("| – / – |")


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


def test_profile_table_has_a_gaps_section_with_their_total():
    def prof(tree, wait_us):
        gaps = {
            "memcpy_dtoh → apply_write_kernel_with_a_name_longer_than_forty": {
                "count": 1,
                "us": wait_us,
            },
            "router → topk": {"count": 24, "us": 20.0},
        }
        step = {"step": "decode batch 1, per step", "wall_ms": 2.0, "kernels": {}}
        step["idle_gaps"] = gaps
        return {**record(tree), "profile": step}

    table = e2e_report.profile_table([prof("base", 100.0), prof("patched", 40.0)])
    gaps = table[table.index("GPU idle µs per gap") :]
    assert "| idle gap: kernel before → kernel after | base µs |" in gaps
    lines = [line for line in gaps.splitlines() if line.startswith("| `")]
    # the total first, then by difference; each side of a pair cut to 38 characters
    assert lines == [
        "| `(all gaps)` | 120.0 | 60.0 | -60.0 |",
        "| `memcpy_dtoh → apply_write_kernel_with_a_name_longer_` | 100.0 | 40.0 | -60.0 |",
        "| `router → topk` | 20.0 | 20.0 | +0.0 |",
    ]


def test_idle_gaps_name_the_activities_around_each_gap():
    from e2e_timeline import idle_gaps

    # main stream: a [0, 10], b [12, 20], a [30, 35]; side stream: s [5, 15]
    activities = [("a", 0.0, 10.0), ("s", 5.0, 15.0), ("b", 12.0, 20.0), ("a", 30.0, 35.0)]
    gaps = idle_gaps(activities)
    # s overlaps b's start, so the only gap is [20, 30], after b
    assert gaps == {"b → a": {"count": 1, "us": 10.0}}
    assert idle_gaps(activities[::-1]) == gaps
    # the activity that ran until the gap is the one ending last, not the last to start
    gaps = idle_gaps([("long", 0.0, 10.0), ("short", 2.0, 3.0), ("next", 11.0, 12.0)])
    assert gaps == {"long → next": {"count": 1, "us": 1.0}}
    # gaps between the same pair add up
    repeated = [("x", 0.0, 1.0), ("y", 2.0, 3.0), ("x", 4.0, 5.0), ("y", 7.0, 8.0)]
    assert idle_gaps(repeated) == {
        "x → y": {"count": 2, "us": 3.0},
        "y → x": {"count": 1, "us": 1.0},
    }
    # touching activities leave no gap
    assert idle_gaps([("x", 0.0, 1.0), ("y", 1.0, 2.0)]) == {}
    # skip leaves out the first activities by start, and the gap after them
    assert idle_gaps(repeated[::-1], skip=2) == {"x → y": {"count": 1, "us": 2.0}}
    assert idle_gaps(repeated, skip=4) == {}
    assert idle_gaps([]) == {}


def test_profile_decode_is_the_prompt_plus_steps_less_the_prompt_per_step(monkeypatch):
    import e2e_engine

    calls = []

    def fake_profile(step, gaps_after=None):
        calls.append(gaps_after)
        tokens = step()  # the fake ``timed`` returns its token count
        decode = tokens - 1
        kernels = {"prompt_attention": {"count": 24, "us": 300.0, "beside_us": 0.0}}
        if decode:
            kernels["fused_moe_kernel"] = {
                "count": 48 * decode,
                "us": 60.0 * decode,
                "beside_us": 20.0 * decode,
            }
        host = {"cudaGraphLaunch": {"count": decode, "us": 5.0 * decode}}
        # the prompt alone runs one stream; decode adds the shared experts' side
        # stream; the span also holds host time between steps, not per step
        timeline = {
            "span_us": 400.0 + 2400.0 * decode + (9000.0 if not decode else 0.0),
            "busy_us": 300.0 + 2000.0 * decode,
            "overlap_us": 700.0 * decode,
            "idle_us": 100.0 + 400.0 * decode + (9000.0 if not decode else 0.0),
        }
        profile = {
            "wall_ms": 1.0 + 2.5 * decode,
            "kernels": kernels,
            "host": host,
            "timeline": timeline,
            "activities": 24 + 48 * decode,
        }
        if gaps_after is not None:
            # the decode steps' gaps: a launch gap in each step's layers
            profile["gaps"] = {"router → topk": {"count": 24 * decode, "us": 12.0 * decode}}
        return profile

    monkeypatch.setattr(e2e_engine, "profile_step", fake_profile)
    prof = e2e_engine.profile_decode(lambda ps, n: n, [], 8)
    assert prof["step"] == "decode batch 8, per step"
    assert prof["wall_ms"] == pytest.approx(2.5)
    # the prompt's kernel cancels; the decode kernel is per step
    assert prof["kernels"] == {"fused_moe_kernel": {"count": 48.0, "us": 60.0, "beside_us": 20.0}}
    assert prof["host"] == {"cudaGraphLaunch": {"count": 1.0, "us": 5.0}}
    # idle gaps: those after the prompt alone's 24 activities, not a difference
    assert calls == [None, 24]
    assert prof["idle_gaps"] == {"router → topk": {"count": 24.0, "us": 12.0}}
    # busy times are per step; no span or idle time, which do not subtract
    assert prof["timeline"] == {
        "busy_us": pytest.approx(2000.0),
        "overlap_us": pytest.approx(700.0),
    }


def test_time_beside_others_counts_each_kernels_shared_time():
    from e2e_timeline import time_beside_others

    # main stream: align [0, 10], gemv [10, 30]; side stream: shared [5, 25]
    activities = [
        ("align", 0.0, 10.0),
        ("gemv", 10.0, 30.0),
        ("shared", 5.0, 25.0),
        ("alone", 40.0, 45.0),
    ]
    beside = time_beside_others(activities)
    assert beside == {"align": 5.0, "gemv": 15.0, "shared": 20.0, "alone": 0.0}
    assert time_beside_others(activities[::-1]) == beside
    # kernels that only touch ran one after the other
    assert time_beside_others([("a", 0.0, 5.0), ("b", 5.0, 9.0)]) == {"a": 0.0, "b": 0.0}
    # a name's activities add up; three at once count for each of them
    three = [("k", 0.0, 4.0), ("k", 2.0, 6.0), ("m", 3.0, 4.0)]
    assert time_beside_others(three) == {"k": 2.0 + 2.0, "m": 1.0}
    assert time_beside_others([]) == {}


def test_gpu_timeline_counts_overlap_once_and_gaps_as_idle():
    from e2e_timeline import gpu_timeline

    # main stream: [0, 10], [12, 20], [30, 35]; side stream: [5, 15]
    intervals = [(0.0, 10.0), (5.0, 15.0), (12.0, 20.0), (30.0, 35.0)]
    timeline = gpu_timeline(intervals)
    assert timeline == {
        "span_us": 35.0,
        "busy_us": 25.0,  # [0, 20] and [30, 35]
        "overlap_us": 8.0,  # [5, 10] and [12, 15]
        "idle_us": 10.0,  # [20, 30]
    }
    # order of the activities does not matter
    assert gpu_timeline(intervals[::-1]) == timeline
    # an activity inside another adds nothing to the busy time
    assert gpu_timeline([(0.0, 10.0), (2.0, 3.0)])["busy_us"] == 10.0
    assert gpu_timeline([]) == {
        "span_us": 0.0,
        "busy_us": 0.0,
        "overlap_us": 0.0,
        "idle_us": 0.0,
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
        timeline = {"span_us": 2000.0, "busy_us": 2000.0 - idle, "overlap_us": 500.0}
        step = {"wall_ms": 2.0, "kernels": {"k": {"count": 1, "us": 1.0}}}
        prefill_timeline = {**timeline, "idle_us": idle}
        return {
            **record(tree),
            "profile": {**step, "step": "prefill 1x2048", "timeline": prefill_timeline},
            # a decode step has no idle row, also from raw files that recorded one
            "decode_profiles": {
                "1": {**step, "step": "decode batch 1", "timeline": prefill_timeline}
            },
        }

    table = e2e_report.profile_table([prof("base", 300.0), prof("patched", 100.0)])
    sections = table.split("a2.7b graph, ")[1:]
    decode, prefill = ([r for r in s.splitlines() if r.startswith("| `(")] for s in sections)
    assert decode == [
        "| `(all kernels)` | 1.0 | 1.0 | +0.0 | – / – |",
        "| `(wall)` | 2000.0 | 2000.0 | +0.0 | – / – |",
        "| `(GPU busy: any stream)` | 1700.0 | 1900.0 | +200.0 | – / – |",
        "| `(GPU busy: two or more streams)` | 500.0 | 500.0 | +0.0 | – / – |",
    ]
    idle = "| `(GPU idle within the span)` | 300.0 | 100.0 | -200.0 | – / – |"
    assert prefill == [*decode, idle]


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


def test_time_decode_records_the_machine_state_with_each_repetition(monkeypatch):
    import e2e_engine

    # a 1-token generation takes 10 ms, a 129-token one 10 + 128 * 2.5 ms,
    # the second repetition's 129 tokens 128 * 0.5 ms longer
    walls = iter([10.0, 330.0, 10.0, 394.0])
    cpu_s = iter([0.0, 0.3, 1.0, 1.1])
    monkeypatch.setattr(e2e_engine.time, "process_time", lambda: next(cpu_s))
    # the host waited on the GPU 200 ms in the first 129 tokens, 4 ms in the second
    waited = iter([5.0, 205.0, 300.0, 304.0])
    monkeypatch.setattr(e2e_engine.GPU_WAITS, "ms", lambda: next(waited))
    loads = iter([1.5, 7.0])
    monkeypatch.setattr(
        e2e_engine,
        "machine_state",
        lambda: {"load1": next(loads), "sm_mhz": 1980, "gpu_c": 40},
    )
    per_token, states = e2e_engine.time_decode(lambda ps, n: next(walls), [], 2)
    assert per_token == pytest.approx([2.5, 3.0])
    assert [s["host_cpu_share"] for s in states] == pytest.approx([300 / 330, 100 / 394])
    assert [s["gpu_wait_share"] for s in states] == pytest.approx([200 / 330, 4 / 394])
    assert [s["load1"] for s in states] == [1.5, 7.0]


def test_gpu_wait_timer_adds_up_the_time_in_synchronize(monkeypatch):
    import e2e_engine

    class Event:
        calls = 0

        def synchronize(self):
            Event.calls += 1
            clock[0] += 0.003  # the wait: 3 ms
            return "done"

    clock = [100.0]
    monkeypatch.setattr(e2e_engine.time, "perf_counter", lambda: clock[0])
    timer = e2e_engine.GpuWaitTimer()
    timer.install(Event)
    timer.install(Event)  # installed once: a second install does not time twice
    assert Event().synchronize() == "done"
    assert Event().synchronize() == "done"
    assert Event.calls == 2
    assert timer.ms() == pytest.approx(6.0)

    class Failing:
        def synchronize(self):
            clock[0] += 0.001
            raise RuntimeError("CUDA error")

    timer.install(Failing)
    with pytest.raises(RuntimeError, match="CUDA error"):
        Failing().synchronize()
    assert timer.ms() == pytest.approx(7.0)


def test_machine_state_reads_none_where_nvml_fails(monkeypatch):
    import e2e_engine
    import torch

    def no_nvml(*_):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    monkeypatch.setattr(torch.cuda, "temperature", lambda *_: 55)
    state = e2e_engine.machine_state()
    assert state["sm_mhz"] is None and state["gpu_c"] == 55
    assert state["load1"] >= 0
    monkeypatch.setattr(e2e_engine.os, "getloadavg", no_nvml)
    assert e2e_engine.machine_state()["load1"] is None


def test_machine_table_lists_each_process_batch_with_its_state():
    states = [
        {"host_cpu_share": 0.61, "gpu_wait_share": 0.3, "load1": 1.2, "sm_mhz": 1980, "gpu_c": 41},
        {"host_cpu_share": 0.97, "gpu_wait_share": 0.01, "load1": 9.5, "sm_mhz": 1755, "gpu_c": 43},
    ]
    unread = {"host_cpu_share": 0.5, "load1": None, "sm_mhz": None, "gpu_c": None}
    rec = record("patched", b1=[2.2, 2.9], b8=[4.6, 4.6]) | {
        "seq": 3,
        "decode_state": {
            "8": states,
            "1": states[:1] + [{**states[1], "sm_mhz": None}],
            "32": [unread],
        },
    }
    text = e2e_report.machine_table([record("base", b1=[2.5]), rec])
    lines = [line for line in text.splitlines() if line.startswith("| a2.7b")]
    # only the process with states; batches in numeric order; a missing clock
    # reading is left out of the range; states from before the GPU waits were
    # recorded show none
    assert lines == [
        "| a2.7b | graph | patched | 3 | 1 | 2.200 2.900 | 0.61 0.97 | 0.30 0.01 | 9.5 "
        "| 1980–1980 | 43 |",
        "| a2.7b | graph | patched | 3 | 8 | 4.600 4.600 | 0.61 0.97 | 0.30 0.01 | 9.5 "
        "| 1755–1980 | 43 |",
        "| a2.7b | graph | patched | 3 | 32 |  | 0.50 | – | – | – | – |",
    ]
    assert e2e_report.machine_table([record("base", b1=[2.5])]) == ""
    # the report prints it with the other diagnostics
    assert text in bench_e2e.diagnostics([record("base", b1=[2.5]), rec])
