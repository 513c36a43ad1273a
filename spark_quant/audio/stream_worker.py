"""Streamed TTS on one vLLM engine plus BiCodec, in its own process: JSON in, JSON out.

    python -m spark_quant.audio.stream_worker SPEC.json RESULT.json

SPEC is a worker engine spec (``serving.client.worker_spec``) plus ``stream``:

    {"codec_dir": ".../BiCodec", "prompts": [{"ids": [...], "mode": "clone", "globals": [32 ints]}],
     "concurrency": [1, 4], "requests": 4, "max_tokens": 400, "ignore_eos": false,
     "count_all_as_semantic": false, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
     "plan": {"first_chunk": 50, "growth": 2.0, "max_chunk": 200, "context": 10},
     "header_tokens": {"controllable": 39, "clone": 1}, "partial_path": "PARTIAL.json"}

``header_tokens`` (fixed-length mode only): per mode, how many generated tokens stand for the header the
real model writes before its first semantic token (controllable: acoustic labels and the 32 global tokens,
39 tokens; clone: ``<|start_semantic_token|>``), so first audio waits for them as it would. ``partial_path``:
the result so far is written there after each concurrency level (a run cut short keeps its finished levels).

The engine and the codec share the process and the device, as in a TTS server: the LLM streams
tokens (vLLM's AsyncLLM, delta outputs) while one codec thread decodes the chunks
(``stream.StreamingRequest``). At concurrency 1, ``requests`` requests run one after another; at
concurrency c, c requests start together and share the one codec. RESULT has one summary per
concurrency and every request's chunk timings. Runs in the serving environment; imports vLLM,
torch, the serving worker and this package only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant.audio.codec import codec_info, load_bicodec
from spark_quant.audio.stream import ChunkPlan, CodecRunner, StreamingRequest
from spark_quant.reporting.audio import summarize
from spark_quant.serving.worker import run_json


async def _one(worker, prompt: dict[str, Any], params, runner: CodecRunner, plan: ChunkPlan,
               all_semantic: bool) -> dict[str, Any]:
    worker._rid += 1
    ids = prompt["ids"]
    engine_ids = worker.perm.to_profile(ids) if worker.perm else ids
    t0 = time.perf_counter()
    req = StreamingRequest(mode=prompt["mode"], plan=plan, runner=runner, t0=t0,
                           prompt_globals=list(prompt.get("globals") or []), count_all_as_semantic=all_semantic,
                           header_tokens=int(prompt.get("header_tokens", 0)) if all_semantic else 0)
    first_token = None
    async for out in worker.engine.generate({"prompt_token_ids": engine_ids}, params, f"s{worker._rid}"):
        new = out.outputs[0].token_ids
        if new:
            if first_token is None:
                first_token = time.perf_counter() - t0
            req.feed(worker.perm.to_original(new) if worker.perm else list(new))
    req.finish()
    rec = await req.done()
    rec["ttft_s"] = first_token
    return rec


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    from spark_quant.serving.worker import Worker, _sampling

    st = spec["stream"]
    plan = ChunkPlan(**st.get("plan", {}))
    codec = load_bicodec(Path(st["codec_dir"]), device="cuda" if spec.get("device") == "cuda" else "cpu")
    w = Worker(spec)
    res: dict[str, Any] = {"engine": await w.start(), "codec": codec_info(codec), "plan": plan.__dict__,
                           "count_all_as_semantic": bool(st.get("count_all_as_semantic")), "rows": []}
    runner = CodecRunner(codec.decode)
    task = {"max_tokens": st["max_tokens"], "ignore_eos": st.get("ignore_eos", False),
            "temperature": st.get("temperature", 0.8), "top_k": st.get("top_k", 50), "top_p": st.get("top_p", 0.95)}
    params = _sampling(task, eos_id=w.eos_id)
    header = st.get("header_tokens") or {}
    prompts = [{**p, "header_tokens": header.get(p["mode"], 0)} for p in st["prompts"]]
    all_sem = bool(st.get("count_all_as_semantic"))
    try:
        # warm up the engine and the codec (its first call is slower) before timing anything
        await _one(w, prompts[0], params, runner, plan, all_sem)
        for c in st["concurrency"]:
            t0 = time.perf_counter()
            if c == 1:
                recs = []
                for i in range(st["requests"]):
                    recs.append(await _one(w, prompts[i % len(prompts)], params, runner, plan, all_sem))
            else:
                recs = await asyncio.gather(*(_one(w, prompts[i % len(prompts)], params, runner, plan, all_sem)
                                              for i in range(c)))
            res["rows"].append({"concurrency": c, "wall_s": time.perf_counter() - t0, "summary": summarize(recs),
                                "requests": recs})
            if st.get("partial_path"):
                Path(st["partial_path"]).write_text(json.dumps({"ok": True, "partial": True, **res}))
            print(f"[stream_worker] c={c}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    finally:
        runner.close()
        w.engine.shutdown()
    return res


def main(argv: list[str] | None = None) -> int:
    return run_json(argv, "spark_quant.audio.stream_worker", _main)


if __name__ == "__main__":
    raise SystemExit(main())
