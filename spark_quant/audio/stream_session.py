"""Streamed TTS as a long-lived session: one vLLM engine plus BiCodec answering ``stream`` tasks.

    python -m spark_quant.audio.stream_session SPEC.json        (serving environment, its own process)

The session protocol of ``spark_quant.serving.session`` (ready line, one JSON request a line, stop) with
one more task kind, so that ``serving.dispatch.Pool`` drives one of these per engine replica
(``audio.stream_pool``), each with its own codec and codec thread, as a TTS server scaled out by
replicas would run:

    {"name": "s", "kind": "stream", "concurrency": 8, "requests": 4, "prompt_offset": 0}

At concurrency 1, ``requests`` requests run one after another; at concurrency c, c requests start
together and share the one codec; prompts are taken in turn from ``prompt_offset``. The answer is every
request's chunk timings, the wall time and the codec's calls, plus the codec's facts.

SPEC is a serving worker spec (``serving.client.worker_spec``) plus ``stream``:

    {"codec_dir": ".../BiCodec", "prompts": [{"ids": [...], "mode": "clone", "globals": [32 ints]}],
     "concurrency": [1, 4], "requests": 4, "max_tokens": 400, "ignore_eos": false,
     "count_all_as_semantic": false, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
     "plan": {"first_chunk": 50, "growth": 2.0, "max_chunk": 200, "context": 10},
     "header_tokens": {"controllable": 39, "clone": 1}, "codec_batch": 16, "partial_path": "PARTIAL.json"}

(``concurrency``, ``requests`` and ``partial_path`` are read by ``audio.stream_pool``.)
``header_tokens`` (fixed-length mode only): per mode, how many generated tokens stand for the header the
real model writes before its first semantic token (controllable: acoustic labels and the 32 global tokens,
39 tokens; clone: ``<|start_semantic_token|>``), so first audio waits for them as it would.
``codec_batch``: the most chunks the codec thread decodes in one batched call (default 1: one per call).
``codec_graphs`` (CUDA only): decode through CUDA graphs (``audio.graphs``; the plan's first chunk and full
chunk lengths are captured at the codec's loading, before any timing).
``codec_order``: ``fifo`` (default), ``deadline`` (the chunk whose playback is due first) or ``playing``
(streams already playing first, then new streams' first chunks in arrival order; ``stream.CodecRunner``).
A stream task may carry ``codec_order``, ``codec_batch`` and ``codec_graphs`` of its own: the codec thread uses
them from that task on (``audio.stream_pool`` alternates such arms round by round).

The engine and the codec share the process and the device, as in a TTS server: the LLM streams tokens
(vLLM's AsyncLLM, delta outputs) while one codec thread decodes the chunks (``stream.StreamingRequest``),
batching the chunks that queued meanwhile up to ``codec_batch``. The codec is loaded at the first stream
task. Runs in the serving environment; imports vLLM, torch, the serving session and this package only.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant.audio.codec import codec_info, load_bicodec
from spark_quant.audio.stream import ChunkPlan, CodecRunner, StreamingRequest
from spark_quant.audio.stream_pool import uses_graphs
from spark_quant.serving import session


class Streams:
    """What streamed TTS adds beside one engine: the codec, its one thread, the chunk plan, the prompts."""

    def __init__(self, spec: dict[str, Any], eos_id: int):
        from spark_quant.serving.worker import _sampling

        st = spec["stream"]
        self.plan = ChunkPlan(**st.get("plan", {}))
        self.codec = load_bicodec(Path(st["codec_dir"]), device="cuda" if spec.get("device") == "cuda" else "cpu")
        self.runner = CodecRunner(decode_batch=self.codec.decode_batch, max_batch=int(st.get("codec_batch", 1)),
                                  order=st.get("codec_order", "playing"))
        arms = st.get("arms") or []
        if uses_graphs(st):  # captured now, before any timing
            self.codec.use_graphs(True)
            sizes = self.plan.sizes()  # the first chunk alone, later full chunks with their context before them
            lengths = sorted({next(sizes)} | {next(sizes) + self.plan.context for _ in range(3)})
            self.codec.prepare_graphs(lengths, max([int(st.get("codec_batch", 1))] +
                                                   [int(a.get("codec_batch", 1)) for a in arms]))
            self.codec.use_graphs(bool(st.get("codec_graphs")))
        self.all_sem = bool(st.get("count_all_as_semantic"))
        header = st.get("header_tokens") or {}
        self.prompts = [{**p, "header_tokens": header.get(p["mode"], 0)} for p in st["prompts"]]
        task = {"max_tokens": st["max_tokens"], "ignore_eos": st.get("ignore_eos", False),
                "temperature": st.get("temperature", 0.8), "top_k": st.get("top_k", 50),
                "top_p": st.get("top_p", 0.95)}
        self.params = _sampling(task, eos_id=eos_id)

    def facts(self) -> dict[str, Any]:
        return {"codec": codec_info(self.codec), "plan": self.plan.__dict__, "codec_batch": self.runner.max_batch,
                "codec_order": self.runner.order, "codec_graphs": self.codec.graphs,
                "count_all_as_semantic": self.all_sem}

    async def level(self, worker, concurrency: int, requests: int = 1, offset: int = 0) -> dict[str, Any]:
        """``requests`` requests one after another (concurrency 1) or ``concurrency`` started together, the
        prompts taken in turn from ``offset``: every request's record, wall time and the codec's calls."""
        before = len(self.runner.calls)
        t0 = time.perf_counter()

        def prompt(i):
            return self.prompts[(offset + i) % len(self.prompts)]

        if concurrency == 1:
            recs = [await self.one(worker, prompt(i)) for i in range(requests)]
        else:
            recs = await asyncio.gather(*(self.one(worker, prompt(i)) for i in range(concurrency)))
        return {"concurrency": concurrency, "wall_s": time.perf_counter() - t0,
                "codec_calls": self.runner.calls_since(before), "requests": list(recs)}

    async def one(self, worker, prompt: dict[str, Any]) -> dict[str, Any]:
        worker._rid += 1
        ids = prompt["ids"]
        engine_ids = worker.perm.to_profile(ids) if worker.perm else ids
        t0 = time.perf_counter()
        req = StreamingRequest(mode=prompt["mode"], plan=self.plan, runner=self.runner, t0=t0,
                               prompt_globals=list(prompt.get("globals") or []), count_all_as_semantic=self.all_sem,
                               header_tokens=int(prompt.get("header_tokens", 0)) if self.all_sem else 0)
        first_token = None
        async for out in worker.engine.generate({"prompt_token_ids": engine_ids}, self.params, f"s{worker._rid}"):
            new = out.outputs[0].token_ids
            if new:
                if first_token is None:
                    first_token = time.perf_counter() - t0
                req.feed(worker.perm.to_original(new) if worker.perm else list(new))
        req.finish()
        rec = await req.done()
        rec["ttft_s"] = first_token
        return rec

    def close(self) -> None:
        self.runner.close()


_streams: list[Streams] = []  # this process's one Streams, made at the first stream task


async def stream_task(worker, task: dict[str, Any]) -> dict[str, Any]:
    if not _streams:
        _streams.append(Streams(worker.spec, worker.eos_id))
    s = _streams[0]
    if "codec_order" in task or "codec_batch" in task:  # an arm of a paired comparison (audio.stream_pool)
        s.runner.configure(task.get("codec_order"), task.get("codec_batch"))
    if "codec_graphs" in task:
        s.codec.use_graphs(bool(task["codec_graphs"]))
    part = await s.level(worker, int(task["concurrency"]), int(task.get("requests", 1)),
                         int(task.get("prompt_offset", 0)))
    return {**part, **s.facts()}


def _close() -> None:
    for s in _streams:
        s.close()


def main(argv: list[str] | None = None) -> int:
    return session.main(argv, kinds={"stream": stream_task}, on_stop=_close,
                        usage="python -m spark_quant.audio.stream_session SPEC.json")


if __name__ == "__main__":
    sys.exit(main())
