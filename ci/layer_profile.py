"""Profiling the blocks (torch.profiler): device kernels in order, per stream, and
per-replay timelines of cold CUDA-graph replays."""

from __future__ import annotations

import statistics

from layer_timing import TimedBlocks


class ProfiledBlocks(TimedBlocks):
    """``TimedBlocks`` plus ``profile``: one forward's device events, eager and graph."""

    def profile(
        self, name: str, n: int, seed: int, cold_replays: int = 0, flush_mb: int = 0
    ) -> dict:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch = self.torch
        eager, replay, captured = self._forwards(name, n, seed)
        result: dict = {}
        with torch.inference_mode(), self._fwd_ctx():
            for mode, fn in (("eager", eager), ("graph", replay)):
                for _ in range(3):
                    fn()
                self._sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    self._sync()
                kernels, stream_note = self._device_events(prof, DeviceType)
                names = [k["name"] for k in kernels]
                result[mode] = {
                    "events": kernels,
                    "n_events": len(kernels),
                    "n_dtod": sum("DtoD" in s for s in names),
                    "n_memcpy": sum(s.startswith("Memcpy") for s in names),
                    "n_memset": sum(s.startswith("Memset") for s in names),
                    "device_us_sum": round(sum(k["us"] for k in kernels), 3),
                    # First start to last end on the device, and per stream
                    # (the shared expert may run on an aux stream, overlapped).
                    "span_us": self._span(kernels),
                    "streams": self._streams(kernels),
                    "stream_note": stream_note,
                }
            if cold_replays and captured:
                result["cold_replays"] = self._profile_cold_replays(
                    replay, cold_replays, flush_mb, profile, ProfilerActivity, DeviceType
                )
        return result

    def _profile_cold_replays(self, replay, count, flush_mb, profile, activities, device_type):
        """Per-stream timelines of ``count`` graph replays, each on a cold L2.

        Queued as the timing queues them (flush, replay, flush, replay, ...,
        no host sync in between) in one profiler session, then cut at the
        flush kernels, which run on the launch stream before each replay.
        One profiled replay cannot show which stream's timeline moves from
        one replay to the next; these can (``ci/plot_layers.py --race``).
        """
        self._flush_buffer(flush_mb or 256)
        self._sync()
        with profile(activities=[activities.CPU, activities.CUDA]) as prof:
            for _ in range(count):
                self._flush.zero_()
                replay()
            self._sync()
        kernels, _ = self._device_events(prof, device_type)
        # The flush is the only int8 fill: the graph's own kernels share its
        # stream, so the stream alone does not tell them apart.
        flushes = [
            i for i, k in enumerate(kernels) if "FillFunctor<" in k["name"] and "char>" in k["name"]
        ]
        if len(flushes) != count:
            return {"count": count, "error": f"found {len(flushes)} flush kernels"}
        replays = []
        for j, i in enumerate(flushes):
            stop = flushes[j + 1] if j + 1 < len(flushes) else len(kernels)
            flush_end = kernels[i]["start_us"] + kernels[i]["us"]
            ks = [
                dict(k, start_us=round(k["start_us"] - flush_end, 3)) for k in kernels[i + 1 : stop]
            ]
            replays.append(
                {
                    "span_us": self._span(ks),
                    "streams": self._streams(ks),
                    "kernels": [[k["name"][:60], k["stream"], k["start_us"], k["us"]] for k in ks],
                }
            )
        spans = sorted(r["span_us"] for r in replays)
        return {
            "count": count,
            "span_from": "the end of the flush kernel before the replay",
            "span_us": {"min": spans[0], "median": statistics.median(spans), "max": spans[-1]},
            "replays": replays,
        }

    @staticmethod
    def _device_events(prof, device_type) -> tuple[list[dict], str]:
        """Device events (kernels, copies) in start order, times in us."""
        kernels: list[dict] = []
        note = "kineto events (stream = CUDA stream id)"
        try:
            for k in prof.profiler.kineto_results.events():
                if k.device_type() != device_type.CUDA or k.name().startswith("["):
                    continue  # host events; "[memory]" allocator records
                kernels.append(
                    {
                        "name": k.name(),
                        "us": k.duration_ns() / 1e3,
                        "start_us": k.start_ns() / 1e3,
                        "stream": int(k.device_resource_id()),
                    }
                )
        except Exception as e:  # fall back to the FunctionEvent view
            note = f"FunctionEvents, no stream ids ({type(e).__name__}: {e})"
            kernels = []
            for ev in prof.events():
                if ev.device_type != device_type.CUDA:
                    continue
                dt = getattr(ev, "device_time", None)
                if dt is None:
                    dt = getattr(ev, "cuda_time", 0.0)
                kernels.append(
                    {
                        "name": ev.name,
                        "us": float(dt),
                        "start_us": float(ev.time_range.start),
                        "stream": None,
                    }
                )
        kernels.sort(key=lambda k: k["start_us"])
        t0 = kernels[0]["start_us"] if kernels else 0.0
        for k in kernels:
            k["start_us"] = round(k["start_us"] - t0, 3)
            k["us"] = round(k["us"], 3)
        return kernels, note

    @staticmethod
    def _span(kernels: list[dict]) -> float:
        """First start to last end on the device, in us."""
        return round(max((k["start_us"] + k["us"] for k in kernels), default=0.0), 3)

    @staticmethod
    def _streams(kernels: list[dict]) -> dict:
        out: dict = {}
        for k in kernels:
            st = out.setdefault(
                str(k["stream"]), {"n": 0, "busy_us": 0.0, "first_us": k["start_us"]}
            )
            st["n"] += 1
            st["busy_us"] = round(st["busy_us"] + k["us"], 3)
            st["last_end_us"] = round(k["start_us"] + k["us"], 3)
        return out
