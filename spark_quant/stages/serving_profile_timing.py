"""Batch-1 decode timing of Spark serving profiles against the models they come from.

    python -m spark_quant.stages.serving_profile_timing --model DIR [--model DIR ...] [--out FILE.json]
        [--tokens 256] [--requests 8] [--repeats 2] [--eager] [--memory 0.6]

For each ``--model`` (a Spark-TTS model folder or a quantized checkpoint) the
profile is built or reused (``<folder>-spark-profile``), then each pair is served
by ``serve_worker`` in its own process, interleaved (A A' B B' A A' ...): a
warm-up of both sampling modes, then ``--requests`` sequential streamed requests
of ``--tokens`` new tokens (ignore EOS), sampled (temperature 0.8, top-k 50,
top-p 0.95) and greedy. Prints a table and, as the last line, one JSON document.
Runs in the serving environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from spark_quant.spark.heldout import heldout_prompts

TEXTS = ("We measure how fast the model writes speech tokens at batch one.",
         "今天的天气很好，我们一起去公园散步吧。",
         "The quick brown fox jumps over the lazy dog near the river bank.",
         "语音合成模型的速度取决于每一步解码所需的时间。")


def prompts(llm: Path) -> list[list[int]]:
    """Controllable and voice-clone prompts in original ids, from the model's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm))
    return [p["ids"] for p in heldout_prompts(TEXTS, len(TEXTS), tok.encode, seed=0)]


def tasks(ids: list[list[int]], tokens: int, requests: int) -> list[dict[str, Any]]:
    samp = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
    return [
        {"name": "warmup", "kind": "warmup", "prompts": ids, "concurrency": [1], "max_tokens": 8, "ignore_eos": True,
         **samp},
        {"name": "warmup_greedy", "kind": "warmup", "prompts": ids, "concurrency": [1], "max_tokens": 8,
         "ignore_eos": True, "greedy": True},
        {"name": "latency", "kind": "latency", "prompts": ids, "requests": requests, "max_tokens": tokens,
         "ignore_eos": True, **samp},
        {"name": "latency_greedy", "kind": "latency", "prompts": ids, "requests": requests, "max_tokens": tokens,
         "ignore_eos": True, "greedy": True},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spark_quant.stages.serving_profile_timing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", required=True, help="model or checkpoint folder")
    ap.add_argument("--out", type=Path, default=None, help="write every run's raw result here (JSON)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs / torch.compile)")
    ap.add_argument("--memory", type=float, default=None, help="gpu_memory_utilization (default 0.6 GPU, 0.3 CPU)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier result of this tool at --out")
    args = ap.parse_args(argv)
    from spark_quant.outputs import check_result_file, write_result_file

    if args.out:
        check_result_file(args.out, "serving_profile_timing", args.overwrite)

    from spark_quant.models.serving_profile import build_profile
    from spark_quant.stages.evaluate import has_cuda_device, latency_metrics, run_worker

    cuda = has_cuda_device()
    pairs = [(m, build_profile(m)) for m in args.model]
    ids = prompts(args.model[0] / "LLM")
    work = Path(tempfile.mkdtemp(prefix="spark-profile-timing-"))
    rows, raw = [], {}
    for rep in range(1, args.repeats + 1):
        for src, prof in pairs:
            for variant, folder in (("default", src), ("spark_profile", prof)):
                spec = {"model": str((folder / "LLM").resolve()), "dtype": "bfloat16",
                        "max_model_len": args.max_model_len, "max_num_seqs": 8,
                        "gpu_memory_utilization": args.memory or (0.6 if cuda else 0.3),
                        "enforce_eager": args.eager, "device": "cuda" if cuda else "cpu", "seed": 0,
                        "tasks": tasks(ids, args.tokens, args.requests)}
                tag = f"{src.name}-{variant}-{rep}"
                res = run_worker(spec, work, tag, timeout_s=1800)
                raw[tag] = res
                if not res.get("ok"):
                    print(f"profile_timing: {tag} failed: {res.get('error')} (log: {work / res['log']})",
                          file=sys.stderr)
                    return 1
                ms = {k: latency_metrics(res["tasks"][k])["ms_per_token"]["p50"] for k in ("latency", "latency_greedy")}
                rows.append({"model": src.name, "variant": variant, "repeat": rep, "sampled_ms": ms["latency"],
                             "greedy_ms": ms["latency_greedy"], "kernels": res["kernels"]})
    summary = []
    print(f"{'model':<40}{'variant':<15}{'sampled ms/tok':>16}{'greedy ms/tok':>15}   (median of {args.repeats})")
    for src, _ in pairs:
        for variant in ("default", "spark_profile"):
            mine = [r for r in rows if r["model"] == src.name and r["variant"] == variant]
            s = statistics.median(r["sampled_ms"] for r in mine)
            g = statistics.median(r["greedy_ms"] for r in mine)
            summary.append({"model": src.name, "variant": variant, "sampled_ms_per_token": s,
                            "greedy_ms_per_token": g, "runs": mine})
            print(f"{src.name:<40}{variant:<15}{s:>16.3f}{g:>15.3f}")
    from spark_quant.envinfo import device_info, git_commit, versions

    doc = {"device": "cuda" if cuda else "cpu", "host": device_info(), "versions": versions(),
           "git_commit": git_commit(), "tokens": args.tokens, "requests": args.requests, "eager": args.eager,
           "results": summary, "logs": str(work)}
    if args.out:
        write_result_file(args.out, doc | {"raw": raw}, "serving_profile_timing", args.overwrite)
    print(json.dumps(doc, default=str))
    return 0


if __name__ == "__main__":
    from spark_quant.errors import run_main

    run_main(main)
