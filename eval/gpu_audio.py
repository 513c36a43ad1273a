"""Streamed TTS on the GPU (issue 16): time to first audio, RTF and underrun, LLM + BiCodec, per model.

    python eval/gpu_audio.py --out DIR --model LABEL=PATH [--model ...] [--concurrency 1,256,1024]
        [--requests 20] [--fixed-tokens 250] [--memory 0.35] [--replicas 1] [--codec-batch N] [--timeout 600]
        [--arms fifo:16,playing:16,playing:64 --rounds 4] [--parallel-start GIB] [--prebuffer-ms MS]
        [--experiment experiments/spark-tts-full_w8a8_int8_gpu.yaml]
    python eval/gpu_audio.py --from docs/results/h100-gpu10/audio-cb-arms/audio.json.gz [--prebuffer-ms MS]

Runs in the serving environment (``$SERVE_PYTHON``). PATH is a model's ``LLM/`` folder. Each model gets
``--replicas`` ``spark_quant.audio.stream_session`` processes (each one vLLM engine with the experiment's
engine settings and one BiCodec on the same GPU, one codec thread), the models one after another: at
concurrency 1 ``--requests`` requests one after another (modes alternating), at concurrency c, c requests
at once. The codec is the model's own ``BiCodec/`` at pretrained_models/Spark-TTS-0.5B when present, else
the embedded random-weight codec. ``--fixed-tokens N`` (for a random-weight LLM, which never writes 50 semantic tokens): N tokens per
request, EOS ignored, every token after the mode's header (controllable 39, clone 1; see stream_session)
decoded as a semantic token. With ``--replicas N`` (``--memory`` each) the requests of a level are split
over the N sessions (``spark_quant.audio.stream_pool``). Writes audio.json (every request's chunk timings)
and audio.md. The tail table's playback margin is each stream's closest call: the least time by which a
later chunk was ready before playback reached it (negative = an underrun; streams of one chunk cannot underrun).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from spark_quant.audio.codec import resolve_codec_dir
from spark_quant.audio.evalstep import stream_prompts
from spark_quant.audio.stream import CODEC_ORDERS, request_margin, request_underrun
from spark_quant.audio.stream_pool import (
    CODEC_GIB,
    CODEC_GRAPHS_GIB,
    engine_memory_share,
    parse_arms,
    stream_over_replicas,
    uses_graphs,
)
from spark_quant.config import REAL_MODEL_DIR, load_experiment
from spark_quant.envinfo import device_info, git_commit, versions
from spark_quant.errors import UserError
from spark_quant.models.folder import load_tokenizer
from spark_quant.outputs import check_not_a_source, check_writable, live_folder
from spark_quant.reporting.audio import arm_table, level_label, stream_table
from spark_quant.reporting.speed_stats import percentile
from spark_quant.serving.client import serve_python, worker_spec
from spark_quant.serving.dispatch import fixed_kv_cache, gpu_memory_gib
from spark_quant.stages.evaluate import eval_prompts

HEADER = {"controllable": 39, "clone": 1}  # tokens the real model writes before its first semantic token


def load_rows(models: dict[str, dict], prebuffer: float | None = None) -> list[str]:
    """Per model and concurrency: tail figures over every request (p99 RTF, first audio p99, underruns), the
    underruns and margins of playback with each request's own prebuffer or ``prebuffer`` (s)."""
    lines = [("| model | c | n | first audio p99 ms | RTF p99 (LLM+codec) | requests with underrun | "
              "underrun max ms | requests of 2+ chunks | playback margin min / p1 ms | codec wait p50 ms | wall s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for row in m.get("rows", []):
            rs = [r for r in row["requests"] if "skipped" not in r]
            if not rs:
                continue
            margins = [x for x in (request_margin(r, prebuffer) for r in rs) if x is not None]
            margin = (f"{min(margins) * 1000:.0f} / {percentile(margins, 0.01) * 1000:.0f}" if margins else "–")
            under = [u for u in (request_underrun(r, prebuffer) for r in rs) if u is not None]
            lines.append(
                f"| {name} | {level_label(row)} | {len(rs)} | "
                f"{percentile([r['first_audio_s'] for r in rs], 0.99) * 1000:.0f} | "
                f"{percentile([r['rtf'] for r in rs], 0.99):.3f} | {sum(1 for _, n in under if n)}/{len(rs)} | "
                f"{max((st for st, _ in under), default=0) * 1000:.0f} | {len(margins)} | {margin} | "
                f"{percentile([r['codec_wait_s'] for r in rs], 0.5) * 1000:.0f} | {row['wall_s']:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="the output folder (required unless --from)")
    ap.add_argument("--model", action="append", help="LABEL=PATH (an LLM/ folder; required unless --from)")
    ap.add_argument("--experiment", type=Path, default=Path("experiments/spark-tts-full_w8a8_int8_gpu.yaml"))
    ap.add_argument("--concurrency", default="1,256,1024")
    ap.add_argument("--requests", type=int, default=20, help="requests at concurrency 1")
    ap.add_argument("--fixed-tokens", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=600, help="the limit when not --fixed-tokens")
    ap.add_argument("--memory", default="0.35", help="each engine's GPU memory: a share (0.28) or an amount "
                    "(18GiB, the same engine on an H100 or an H200); refused when the engines leave their codec "
                    "sessions too little")
    ap.add_argument("--replicas", type=int, default=1, help="engine + codec sessions per model, the requests "
                    "split over them (spark_quant.audio.stream_pool)")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--overwrite", action="store_true", help="replace a finished gpu_audio folder at --out")
    ap.add_argument("--no-warm-levels", dest="warm_levels", action="store_false",
                    help="skip the untimed round at each concurrency > 1 (2026-12-02's H200 run had none: every "
                         "replica JIT-compiled vLLM's top-k/top-p kernel inside the timed c = 1024 round)")
    ap.add_argument("--codec-batch", type=int, help="most queued chunks per batched codec call (default: the "
                    "experiment's eval.audio_codec_batch)")
    ap.add_argument("--codec-order", choices=CODEC_ORDERS, help="the codec thread's queue order (default: "
                    "the experiment's eval.audio_codec_order)")
    ap.add_argument("--codec-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="decode through CUDA graphs (default: the experiment's eval.audio_codec_graphs)")
    ap.add_argument("--arms", help="a paired comparison of codec settings at each concurrency > 1: "
                    "ORDER:BATCH[:graphs],... (e.g. fifo:16,playing:16,playing:16:graphs), each run once per round "
                    "on the same engines and prompts, "
                    "rotated by one each round; the first arm is the reference")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the --arms comparison")
    ap.add_argument("--parallel-start", type=float, default=None, metavar="GIB", help="start each model's "
                    "--replicas sessions at once, each engine with a fixed KV cache of GIB (vLLM's "
                    "kv_cache_memory_bytes; one after another otherwise)")
    ap.add_argument("--prebuffer-ms", type=int, default=None, help="the listener's playback starts this long after "
                    "the first chunk (default: the experiment's eval.audio_prebuffer_ms); with --from, the saved "
                    "chunks replayed with it")
    ap.add_argument("--from", dest="saved", type=Path, help="print the tables of a saved run's audio.json "
                    "(or .json.gz) and stop: nothing is run or written")
    a = ap.parse_args()
    if a.saved is not None:
        import gzip

        raw = a.saved.read_bytes()
        saved = json.loads(gzip.decompress(raw) if a.saved.suffix == ".gz" else raw)
        pb = None if a.prebuffer_ms is None else a.prebuffer_ms / 1000
        head = ("Tail figures over every request of a level" + ("" if pb is None else
                f", the saved chunks played with a {a.prebuffer_ms} ms prebuffer") + ":")
        print("\n".join([head, "", *load_rows(saved["models"], pb), "",
                         *(arm_table(saved["models"]) if pb is None else [])]))  # the arms as run: no prebuffer
        return 0
    if a.out is None or not a.model:
        ap.error("--out and --model are required (or --from a saved audio.json)")
    try:
        check_writable(a.out, a.overwrite, "gpu_audio")  # before any work; live_folder checks again as it claims it
    except UserError as err:
        raise SystemExit(f"gpu_audio: {err}") from None
    if a.parallel_start is not None and a.parallel_start <= 0:
        ap.error(f"--parallel-start {a.parallel_start}: the KV cache of each engine in GiB must be > 0")
    try:
        arms = parse_arms(a.arms) if a.arms else []
    except ValueError as err:
        raise SystemExit(f"gpu_audio: {err}") from None
    conc = [int(c) for c in a.concurrency.split(",")]
    models = [(lb, Path(p)) for lb, _, p in (m.partition("=") for m in a.model)]
    try:
        check_not_a_source(a.out, [p for _, p in models], "gpu_audio")
    except UserError as err:
        raise SystemExit(f"gpu_audio: {err}") from None
    exp = load_experiment(a.experiment, [f"eval.concurrency={sorted(set(conc))}", "eval.num_prompts=32"])
    prompts = eval_prompts(exp, load_tokenizer(models[0][1]), [])
    codec_dir, random_codec = resolve_codec_dir(REAL_MODEL_DIR if (REAL_MODEL_DIR / "BiCodec").exists() else None)
    fixed = a.fixed_tokens
    res_host = device_info()
    graphs = exp.eval.audio_codec_graphs if a.codec_graphs is None else a.codec_graphs
    share, total_gib = None, res_host.get("gpu_memory_gib") or gpu_memory_gib()
    if total_gib:  # before the output folder: a refused plan leaves nothing behind
        codec_gib = CODEC_GRAPHS_GIB if uses_graphs({"codec_graphs": graphs, "arms": arms}) else CODEC_GIB
        try:
            share = engine_memory_share(a.memory, a.replicas, total_gib, codec_gib)
        except ValueError as err:
            raise SystemExit(f"gpu_audio: {err}") from None
    if share is None and worker_spec(exp, models[0][1], "bfloat16")["device"] == "cuda":
        raise SystemExit("gpu_audio: cannot read the GPU's memory (torch, nvidia-smi) to size --memory; "
                         "check that nvidia-smi runs")
    with live_folder(a.out, "gpu_audio", a.overwrite, {"argv": sys.argv[1:]}):  # measured rows kept if cut off
        logs = a.out / "logs"
        logs.mkdir()
        e = exp.eval
        prebuffer_ms = e.audio_prebuffer_ms if a.prebuffer_ms is None else a.prebuffer_ms
        res = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
               "versions": versions(), "host": res_host, "engine_memory_share": share,
               "codec_random_weights": random_codec, "fixed_tokens": fixed, "header_tokens": HEADER if fixed else {},
               "concurrency": conc, "requests_at_c1": a.requests, "models": {}}
        for label, path in models:
            partial = logs / f"{label}-stream.partial.json"
            partial.unlink(missing_ok=True)
            stream = {"codec_dir": str(codec_dir.resolve()), "prompts": stream_prompts(prompts, bool(fixed)),
                      "concurrency": conc, "requests": a.requests, "max_tokens": fixed or a.max_tokens,
                      "ignore_eos": bool(fixed), "count_all_as_semantic": bool(fixed),
                      "header_tokens": HEADER if fixed else {}, "partial_path": str(partial.resolve()),
                      "temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p,
                      "plan": {"first_chunk": e.audio_first_chunk_tokens, "prebuffer_s": prebuffer_ms / 1000},
                      "codec_batch": a.codec_batch or e.audio_codec_batch, "warm_levels": a.warm_levels,
                      "codec_order": a.codec_order or e.audio_codec_order, "arms": arms, "rounds": a.rounds,
                      "codec_graphs": graphs}
            spec = {**worker_spec(exp, path, "bfloat16"), "max_num_seqs": max(conc), "stream": stream}
            if a.parallel_start:
                spec["engine_overrides"] = {**spec["engine_overrides"], **fixed_kv_cache(a.parallel_start)}
            if spec["device"] == "cuda":
                spec["gpu_memory_utilization"] = share
            t0 = time.time()
            r = stream_over_replicas(spec, a.replicas, logs, serve_python(), f"{label}-stream", a.timeout,
                                     parallel=bool(a.parallel_start))
            r["seconds"] = round(time.time() - t0, 1)
            res["models"][label] = r
            (a.out / "audio.json").write_text(json.dumps(res) + "\n")
            print(f"gpu_audio: {label} done in {r['seconds']} s (ok={r.get('ok')}, error={r.get('error')})",
                  flush=True)
        src = (f"{fixed} tokens per request, EOS ignored, every token after the mode's header (controllable 39, "
               f"clone 1) decoded as a semantic token" if fixed else "sampled until <|im_end|>")
        md = [f"# Streamed audio on the GPU ({res['host']})", "",
              f"Commit {res['git_commit']}; {json.dumps(res['versions'])}", "",
              f"Tokens: {src}. Codec: {codec_dir}"
              + (" (RANDOM weights: noise, real compute)" if random_codec else ""),
              "", *stream_table(res["models"]), "", "Tail figures over every request of a level:", "",
              *load_rows(res["models"]), ""]
        if arms:
            md += [(f"Codec arms, paired: {a.rounds} rounds at each concurrency > 1, every arm once per round on the "
                    "same engines and prompts, rotated by one each round. Intervals: Wilson for the underrun share; "
                    "bootstrap over requests for first audio and for the paired differences from the first arm "
                    "(requests of one round share the codec queue, so the per-round counts show the spread between "
                    "rounds)."), "",
                   *arm_table(res["models"]), ""]
        (a.out / "audio.md").write_text("\n".join(md))
        print("\n".join(md))
        return 0 if all(m.get("ok") for m in res["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
