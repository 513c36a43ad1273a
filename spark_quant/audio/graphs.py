"""CUDA graphs of BiCodec's forward pass (``eval.audio_codec_graphs``, ``Codec.use_graphs``).

Measured on an H100 (2026-12-06, job gpu12, ``audio.bench --graphs 1 16 --profile``, n = 20 paired trials):
alone on the GPU an eager pass of one chunk takes 6-8 ms, of which 2.6-5.1 ms are GPU kernels (~450), so
graphs decode 1.44-2.19x faster there; at batch 16 the kernels are 67-93% of the pass (under the profiler)
and graphs gain 1.03-1.08x.
Under load (3 engines at c = 1,024 beside their codecs) graphs made first audio 1.14x later than eager
(docs/benchmarks.md): the codec there is slowed by sharing the GPU, not by launching kernels. Off by default.
"""

from __future__ import annotations

import time
from typing import Any

from spark_quant import spark

GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # a CUDA graph's batch: the call's chunks padded up to one of these
GRAPH_AFTER = 2  # a (batch, length) shape is captured the second time it is decoded (the first runs eagerly)
GRAPH_LIMIT = 256  # the most graphs one codec keeps; shapes beyond it run eagerly


class Graphs:
    """CUDA graphs of the BiCodec forward pass, one per (padded batch, semantic length), sharing one memory
    pool: a graph replays the forward pass's ~450 kernels without launching each one from Python.
    Padding rows repeat the first chunk and are dropped (each row is computed on its own); a shape whose
    capture fails runs eagerly from then on (``failed``)."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, int], tuple[Any, Any, Any, Any]] = {}  # (replay, sem, glob, out)
        self.seen: dict[tuple[int, int], int] = {}
        self.failed: dict[tuple[int, int], str] = {}
        self.pool = None
        self.stats = {"captured": 0, "capture_s": 0.0, "replayed_passes": 0, "eager_passes": 0}

    @staticmethod
    def bucket(b: int) -> int | None:
        return next((g for g in GRAPH_BATCHES if g >= b), None)

    def capture(self, forward, key: tuple[int, int], device: str) -> bool:
        import torch

        t0 = time.perf_counter()
        b, n = key
        try:
            sem = torch.zeros((b, n), dtype=torch.long, device=device)
            glob = torch.zeros((b, 1, spark.N_GLOBAL), dtype=torch.long, device=device)
            replay, out = self.record(forward, sem, glob)
        except RuntimeError as e:  # e.g. an op that cannot be captured: this shape stays eager
            self.failed[key] = (str(e).splitlines() or [type(e).__name__])[0][:200]
            return False
        self.graphs[key] = (replay, sem, glob, out)
        self.stats["captured"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return True

    def record(self, forward, sem, glob):
        """A CUDA graph of ``forward`` on the static inputs ``sem``, ``glob``: (its replay, its static output)."""
        import torch

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN plans, TorchScript's fused snake)
            for _ in range(3):
                forward(sem, glob)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward(sem, glob)
        return graph.replay, out

    def run(self, forward, sem, glob, device: str):
        """``forward(sem, glob)`` through a graph when this shape has one (or gets one now), else eagerly."""
        b, n = sem.shape
        g = self.bucket(b)
        key = (g, n)
        if g is not None and key not in self.graphs and key not in self.failed:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= GRAPH_AFTER and len(self.graphs) < GRAPH_LIMIT:
                self.capture(forward, key, device)
        if key not in self.graphs:
            self.stats["eager_passes"] += 1
            return forward(sem, glob)
        replay, s_sem, s_glob, out = self.graphs[key]
        s_sem[:b].copy_(sem)
        s_glob[:b].copy_(glob)
        if g > b:  # padding rows: the first chunk again
            s_sem[b:].copy_(sem[:1].expand(g - b, -1))
            s_glob[b:].copy_(glob[:1].expand(g - b, -1, -1))
        replay()
        self.stats["replayed_passes"] += 1
        return out[:b]

    def info(self) -> dict[str, Any]:
        return {**self.stats, "capture_s": round(self.stats["capture_s"], 2), "graphs": len(self.graphs),
                "failed_shapes": len(self.failed), "first_failure": next(iter(self.failed.values()), None)}
