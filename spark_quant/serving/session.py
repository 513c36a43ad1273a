"""A long-lived vLLM engine that answers many task lists: one JSON line in, one JSON line out.

    python -m spark_quant.serving.session SPEC.json        (serving environment, its own process)

SPEC is a serve_worker spec without tasks (model, dtype, engine settings, ``engine_overrides`` such as
``distributed_executor_backend`` or ``data_parallel_size``). The engine starts once; then the process
writes ``{"event": "ready", "engine": {...}}`` and reads requests from stdin, one JSON object a line:

    {"id": 7, "tasks": [{"name": "t", "kind": "load", ...}, ...]}   ->  {"id": 7, "ok": true, "tasks": {"t": {...}}}
    {"cmd": "stop"}  (or end of input)                               ->  the engine shuts down, the process exits

Tasks are serve_worker's kinds (``greedy``, ``sampled``, ``warmup``, ``latency``, ``throughput``, ``score``)
and ``load``: ``concurrency`` requests started together, each streamed; per request the time to the first
token, to the first ``first_audio_tokens`` tokens (1 s of audio at 50 tokens/s), to the last token, and the
token count. Replies go to the original stdout; everything else the process prints (vLLM's logs too) is sent
to stderr, so the protocol stream carries nothing but replies. The one-shot ``serve_worker`` is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.serving.worker import Worker, _sampling

FIRST_AUDIO_TOKENS = spark.SEMANTIC_PER_SECOND  # 1 s of audio


def request_times(stamps: list[tuple[float, int]], first_audio_tokens: int) -> dict[str, Any]:
    """From one streamed request's (seconds, tokens so far) stamps: ttft, first audio, total, n."""
    if not stamps:
        return {"ttft": None, "first_audio": None, "total": None, "n": 0}
    return {"ttft": stamps[0][0],
            "first_audio": next((t for t, c in stamps if c >= first_audio_tokens), None),
            "total": stamps[-1][0], "n": stamps[-1][1]}


async def load_task(worker: Worker, task: dict[str, Any]) -> dict[str, Any]:
    """``concurrency`` requests started together (prompts taken in turn from ``prompts``), streamed."""
    c = int(task["concurrency"])
    params = _sampling(task, greedy=task.get("greedy", False), eos_id=worker.eos_id)
    prompts = task["prompts"]
    first = int(task.get("first_audio_tokens", FIRST_AUDIO_TOKENS))
    offset = int(task.get("prompt_offset", 0))  # a replica's share starts where the previous one's ended
    t0 = time.perf_counter()
    recs = await asyncio.gather(*(worker.one(prompts[(offset + i) % len(prompts)], params) for i in range(c)))
    wall = time.perf_counter() - t0
    return {"concurrency": c, "wall_s": wall, "output_tokens": sum(len(r["tokens"]) for r in recs),
            "requests": [request_times(r["stamps"], first) for r in recs]}


KINDS: dict[str, Callable[[Worker, dict[str, Any]], Awaitable[dict[str, Any]]]] = {"load": load_task}


async def answer(worker: Worker, msg: dict[str, Any], kinds=None) -> dict[str, Any]:
    """Run a request's tasks in order; ``kinds`` adds task kinds (name -> ``async f(worker, task)``)."""
    handlers = {**KINDS, **(kinds or {})}
    out: dict[str, Any] = {"id": msg.get("id"), "tasks": {}}
    try:
        for task in msg["tasks"]:
            t0 = time.perf_counter()
            handler = handlers.get(task["kind"])
            r = await (handler(worker, task) if handler else worker.run_task(task))
            worker.results[task["name"]] = r
            r["seconds"] = round(time.perf_counter() - t0, 4)
            out["tasks"][task["name"]] = r
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 (the engine stays up; the caller sees the error for this request)
        traceback.print_exc()
        out.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
    return out


async def serve(spec: dict[str, Any], proto, kinds=None, on_stop=None) -> int:
    """Start the engine, say ready, answer requests until stop; ``kinds`` as in ``answer``, ``on_stop()`` runs
    before the engine shuts down (a task kind's own resources)."""
    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from spark_quant.serving.plugins import ensure_plugins

    ensure_plugins(spec.get("plugins") or [])
    worker = Worker(spec)
    try:
        engine = await worker.start()
    except Exception as e:  # noqa: BLE001 (any start failure is reported to the dispatcher, not a hang)
        traceback.print_exc()
        send({"event": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]})
        return 1
    engine["pid"] = os.getpid()
    send({"event": "ready", "engine": engine})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("cmd") == "stop":
                break
            send(await answer(worker, msg, kinds))
    finally:
        if on_stop:
            on_stop()
        worker.engine.shutdown()
    return 0


def main(argv: list[str] | None = None, kinds=None, on_stop=None,
         usage: str = "python -m spark_quant.serving.session SPEC.json") -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # the protocol keeps the real stdout; fd 1 (vLLM's log stream, stray prints) goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return asyncio.run(serve(spec, proto, kinds, on_stop))


if __name__ == "__main__":
    raise SystemExit(main())
