"""The eval stage's audio step: one call with what the eval already has.

``audio_step`` decodes WAV samples from the workers' greedy outputs (``eval.audio_samples``) and
runs the streamed measurement (``eval.audio_stream_concurrency``) on ``eval.replicas`` engine +
codec sessions per model (``audio.stream_pool``, in the serving environment's ``python``); it
returns the keys to merge into results.json (``audio``, ``audio_stream``). A problem
with the codec or the audio folder becomes a one-line reason under that key and a warning on
stderr: the rest of the eval is kept.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.audio.codec import load_bicodec, resolve_codec_dir
from spark_quant.audio.samples import prompt_globals, write_audio_samples
from spark_quant.audio.stream_pool import CODEC_GIB, CODEC_GRAPHS_GIB, fitting_share, stream_over_replicas
from spark_quant.errors import UserError
from spark_quant.serving.client import serve_python
from spark_quant.serving.dispatch import gpu_memory_gib

BUILD_ROOT = Path("build")


def stream_prompts(prompts: list[dict[str, Any]], all_semantic: bool) -> list[dict[str, Any]]:
    """Prompts for the stream worker, interleaved by mode, each with the globals the codec will use."""
    rng = random.Random(99)
    by_mode = {m: [p for p in prompts if p["mode"] == m] for m in ("controllable", "clone")}
    order = [p for pair in zip(by_mode["controllable"], by_mode["clone"]) for p in pair] or prompts
    out = []
    for p in order:
        glob = prompt_globals(p["ids"]) if p["mode"] == "clone" else []
        if all_semantic and len(glob) != spark.N_GLOBAL:  # random proxy: stand-in voice
            glob = [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(spark.N_GLOBAL)]
        out.append({"ids": p["ids"], "mode": p["mode"], "globals": glob})
    return out


def token_source(exp, is_proxy: bool) -> str:
    e = exp.eval
    model = (f"embedded {exp.proxy_size} proxy ({exp.proxy_weights} weights)" if is_proxy else "the given model")
    if e.audio_stream_fixed_tokens:
        return (f"{model}: {e.audio_stream_fixed_tokens} tokens per request, EOS ignored, every generated token "
                f"decoded as one semantic token (fixed-length mode)")
    return f"{model}: sampled until <|im_end|> (at most {e.similarity_max_tokens} tokens), semantic tokens decoded"


def audio_step(exp, out_dir: Path, prompts: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
               model_dir: Path, is_proxy: bool, specs: dict[str, dict[str, Any]], logs: Path,
               python: str | None = None) -> dict[str, Any]:
    e = exp.eval
    res: dict[str, Any] = {}
    try:
        codec_dir, _ = resolve_codec_dir(None if is_proxy else model_dir, BUILD_ROOT)
        codec = load_bicodec(codec_dir) if e.audio_samples else None
    except UserError as err:
        print(f"eval: audio skipped: {err}", file=sys.stderr, flush=True)
        reason = {"skipped_all": str(err)}
        return {"audio": reason} | ({"audio_stream": reason} if e.audio_stream_concurrency else {})
    if codec is not None:
        try:
            res["audio"] = write_audio_samples(Path(out_dir) / "audio", prompts, runs, codec, e.audio_samples)
        except UserError as err:
            print(f"eval: audio samples skipped: {err}", file=sys.stderr, flush=True)
            res["audio"] = {"skipped_all": str(err)}
        del codec
    if e.audio_stream_concurrency:
        fixed = e.audio_stream_fixed_tokens
        stream = {"codec_dir": str(codec_dir.resolve()), "prompts": stream_prompts(prompts, bool(fixed)),
                  "concurrency": e.audio_stream_concurrency, "requests": e.audio_stream_requests,
                  "max_tokens": fixed or e.similarity_max_tokens, "ignore_eos": bool(fixed),
                  "count_all_as_semantic": bool(fixed), "temperature": e.temperature, "top_k": e.top_k,
                  "top_p": e.top_p,
                  "plan": {"first_chunk": e.audio_first_chunk_tokens, "prebuffer_s": e.audio_prebuffer_ms / 1000},
                  "codec_batch": e.audio_codec_batch, "codec_order": e.audio_codec_order}
        models = {}
        for name, spec in specs.items():
            graphs = e.audio_codec_graphs and spec.get("device") == "cuda"
            if e.audio_codec_graphs and not graphs:
                print(f"eval: eval.audio_codec_graphs needs a CUDA device; {name}'s codec runs eagerly on the CPU",
                      file=sys.stderr, flush=True)
            spec = {**spec, "max_num_seqs": max(spec.get("max_num_seqs", 1), *e.audio_stream_concurrency),
                    "stream": {**stream, "codec_graphs": graphs}}
            if spec.get("device") == "cuda" and e.replicas > 1:  # a share of the GPU each, as the paired run,
                # lowered where the engines would leave their codecs too little (3 x 0.3 does on an H100)
                try:
                    spec["gpu_memory_utilization"] = fitting_share(
                        min(spec.get("gpu_memory_utilization", 0.9), 0.9 / e.replicas), e.replicas, gpu_memory_gib(),
                        CODEC_GRAPHS_GIB if graphs else CODEC_GIB)
                except ValueError as err:
                    print(f"eval: audio stream of {name} skipped: {err}", file=sys.stderr, flush=True)
                    models[name] = {"ok": False, "error": str(err)}
                    continue
            r = stream_over_replicas(spec, e.replicas, logs, python or serve_python(), f"{name}-stream", e.timeout_s)
            models[name] = r if r.get("ok") else {"ok": False, "error": r.get("error")}
        res["audio_stream"] = {"token_source": token_source(exp, is_proxy), "plan": stream["plan"],
                               "codec_batch": e.audio_codec_batch, "codec_order": e.audio_codec_order,
                               "codec_graphs": e.audio_codec_graphs,
                               "replicas": e.replicas,
                               "requests_at_c1": e.audio_stream_requests, "models": models}
    return res
