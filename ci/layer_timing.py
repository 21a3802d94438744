"""Timing the blocks: eager calls and CUDA-graph replays, hot or cold L2 (CUDA events)."""

from __future__ import annotations

import statistics
import time

from layer_blocks import LayerBlocks


class TimedBlocks(LayerBlocks):
    """``LayerBlocks`` plus ``time``: per-call or per-loop times of one block and N."""

    def _loop(self, fn, iters: int, reps: int, warm_ms: float = 20.0) -> list[float]:
        torch = self.torch
        # Warm up for >= warm_ms (and >= 3 calls): clocks, caches, allocator.
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or (time.perf_counter() - t0) * 1e3 < warm_ms:
            fn()
            calls += 1
            if calls % 8 == 0:
                self._sync()
        self._sync()
        out = []
        if self.smoke:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                out.append((time.perf_counter() - t0) * 1e6 / iters)
            return out
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1000.0 / iters)
        return out

    def _flush_buffer(self, flush_mb: int):
        """The buffer zeroed before a cold-L2 call (``flush_mb`` MiB), kept across calls."""
        size = flush_mb << 20
        if getattr(self, "_flush", None) is None or self._flush.numel() != size:
            self._flush = self.torch.empty(size, dtype=self.torch.int8, device="cuda")
        return self._flush

    def _percall(self, fn, calls: int, flush_mb: int, warm_ms: float = 20.0):
        """Per-call CUDA-event times, L2 flushed before every call (cold L2).

        As ``triton.testing.do_bench`` does: a ``flush_mb`` buffer is zeroed
        before each call, outside the timed events, so every forward reads its
        weights from HBM as it does in a model whose other layers evict them.
        """
        torch = self.torch
        self._flush_buffer(flush_mb)
        t0 = time.perf_counter()
        k = 0
        while k < 3 or (time.perf_counter() - t0) * 1e3 < warm_ms:
            self._flush.zero_()
            fn()
            k += 1
            if k % 8 == 0:
                self._sync()
        self._sync()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        for i in range(calls):
            self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        self._sync()
        return [a.elapsed_time(b) * 1000.0 for a, b in zip(starts, ends, strict=False)]

    def _forwards(self, name: str, n: int, seed: int):
        """(eager forward, graph replay, whether a graph was captured) of one block and N;
        without a captured graph (CPU smoke) the replay is the eager forward."""
        block = self.blocks[name]
        x = self._input(name, n, seed)
        g, _ = self.graphs[(name, n)]
        eager = lambda: block(x)  # noqa: E731
        return eager, (g.replay if g is not None else eager), g is not None

    def time(
        self,
        name: str,
        n: int,
        seed: int,
        iters: dict,
        reps: int,
        flush_mb: int = 0,
        calls: dict | None = None,
    ) -> dict:
        """Time eager and graph.

        With ``flush_mb`` (and not in smoke mode): ``calls[mode]`` single calls,
        each after an L2 flush, median per call. Else hot L2: ``reps`` loops of
        ``iters[mode]`` back-to-back calls (0: calibrate to ~3 ms loops).
        """
        torch = self.torch
        eager, replay, _ = self._forwards(name, n, seed)
        res: dict = {}
        with torch.inference_mode(), self._fwd_ctx():
            for mode, fn in (("eager", eager), ("graph", replay)):
                if flush_mb and not self.smoke:
                    t = sorted(self._percall(fn, calls[mode], flush_mb))
                    q = [t[int(f * (len(t) - 1))] for f in (0.1, 0.25, 0.75, 0.9)]
                    res[mode] = {
                        "us": statistics.median(t),
                        "p10_p25_p75_p90": [round(v, 3) for v in q],
                        "calls": len(t),
                        "iters": 1,
                    }
                    continue
                it = iters.get(mode) or 0
                if not it:
                    t = statistics.median(self._loop(fn, 5, 3))
                    it = max(10, min(500, int(3000.0 / max(t, 1e-3))))
                times = self._loop(fn, it, reps)
                res[mode] = {"us": statistics.median(times), "reps": times, "iters": it}
        return res
