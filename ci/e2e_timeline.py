"""How a profiled step's device activities fill the GPU's time: pure
functions over (start µs, end µs) intervals, for ``e2e_engine.profile_step``
and ``e2e_report``.

No per-stream times: a CUDA graph's replay runs its kernels on streams of the
graph's own, so a stream's busy time says nothing about which branch of the
model it carried. What the intervals do say is when two activities ran at
once (at decode, the shared expert's kernels beside the critical path) and
what the GPU waited between (``idle_gaps``).
"""

from __future__ import annotations

from collections import defaultdict

# The fields of ``gpu_timeline`` that add up over decode steps, so a
# difference of two profiles gives them per step.
PER_STEP_TIMELINE = ("busy_us", "overlap_us")


def gpu_timeline(intervals: list[tuple[float, float]]) -> dict:
    """The span of the activities, the time any of them was running, the
    time two or more were, and the span's idle time (launch gaps, waits on
    the host)."""
    busy, covered_to = 0.0, None
    for start, end in sorted(intervals):
        if covered_to is None or start > covered_to:
            busy += end - start
            covered_to = end
        elif end > covered_to:
            busy += end - covered_to
            covered_to = end
    span = max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else 0.0
    return {
        "span_us": span,
        "busy_us": busy,
        "overlap_us": sum(e - s for s, e in intervals) - busy,
        "idle_us": span - busy,
    }


def time_beside_others(activities: list[tuple[str, float, float]]) -> dict[str, float]:
    """Per activity name, the time its activities (name, start µs, end µs)
    ran while at least one other activity was running too: how much of a
    kernel's time it shared the GPU, for instance a one-block kernel beside
    another stream's GEMM."""
    # A sweep over the boundaries; ends sort before starts at the same time,
    # so activities that only touch do not count as side by side.
    events = sorted(
        [(start, 1, i) for i, (_, start, _) in enumerate(activities)]
        + [(end, 0, i) for i, (_, _, end) in enumerate(activities)]
    )
    beside: dict[str, float] = defaultdict(float)
    active: set[int] = set()
    last = None
    for time, is_start, i in events:
        if last is not None and len(active) >= 2:
            for j in active:
                beside[activities[j][0]] += time - last
        last = time
        if is_start:
            active.add(i)
        else:
            active.discard(i)
    return {name: beside.get(name, 0.0) for name, _, _ in activities}


def idle_gaps(
    activities: list[tuple[str, float, float]], skip: int = 0
) -> dict[str, dict[str, float]]:
    """The GPU's idle time between activities (name, start µs, end µs), by the
    pair around each gap, "before → after": the activity that ran until the
    gap (the one ending last) and the one that ended it. The first ``skip``
    activities in order of start are left out (a profile's prompt, ahead of
    the decode steps). Inside a CUDA graph idle time shows as gaps between
    dependent kernels; a step waiting for the host, as a gap before its
    first activity."""
    gaps: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "us": 0.0})
    before, covered_to = None, None
    for name, start, end in sorted(activities, key=lambda a: (a[1], a[2]))[skip:]:
        if covered_to is not None and start > covered_to:
            gap = gaps[f"{before} → {name}"]
            gap["count"] += 1
            gap["us"] += start - covered_to
        if covered_to is None or end > covered_to:
            before, covered_to = name, end
    return dict(gaps)
