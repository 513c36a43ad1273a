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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import fingerprint, require_manifest, verify_files, write_manifest
from spark_quant.config import Experiment
from spark_quant.envinfo import device_info, git_commit, now, versions
from spark_quant.errors import Inconclusive, StageFailed
from spark_quant.models.ensure import ensure_model
from spark_quant.models.folder import load_tokenizer, model_fingerprint, read_config
from spark_quant.outputs import begin_stage, stage_folder
from spark_quant.reporting.gates import check_gates, verdict
from spark_quant.reporting.metrics import (
    fidelity,
    greedy_similarity,
    hist_distance,
    ratio,
    ratio_by_repeat,
    roofline,
    sampled_quality,
    speed_summary,
    teacher_forced,
)
from spark_quant.reporting.stats import pct
from spark_quant.serving.client import (
    EXPECTED_KERNEL,
    baseline_cache_dir,
    cached_run,
    check_serving_env,
    fp8_capable,
    run_worker,
    similarity_tasks,
    timing_tasks,
    worker_spec,
)
from spark_quant.spark.corpus import REFERENCES, read_heldout
from spark_quant.spark.heldout import heldout_prompts, random_globals
from spark_quant.stages.upstream import check_checkpoint as check_upstream_checkpoint


# --- prompts -----------------------------------------------------------------------
def eval_prompts(exp: Experiment, tok, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """num_prompts controllable + num_prompts clone prompts from the held-out texts (seeded); clone voices
    are the calibration's references where it has them."""
    texts = read_heldout(exp.eval.heldout, exp.calibration.corpus)
    voices = (lambda i, rng: refs[i % len(refs)]["global"]) if refs else random_globals
    return heldout_prompts(texts, exp.eval.num_prompts, tok.encode, clone_globals=voices)


# --- running workers ----------------------------------------------------------------


# --- metrics ----------------------------------------------------------------------


# --- the stage ----------------------------------------------------------------------


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
    ckpt_dir, ckpt_derived = exp.folder(ckpt_dir, exp.checkpoint_dir)
    out, derived = exp.folder(out, exp.results_dir)
    model_dir, is_proxy = exp.resolved_model()
    check_serving_env(exp)
    qman = require_manifest(ckpt_dir, "quantize", "run `make quantize` (spark-quant quantize) first")
    verify_files(ckpt_dir, qman)
    base_llm = ensure_model(model_dir, is_proxy, exp.proxy_size, exp.proxy_seed, exp.proxy_weights)
    if ckpt_derived:  # the pipeline's checkpoint must be made from what the experiment asks for
        check_upstream_checkpoint(exp, model_dir, ckpt_dir, qman)
    quant_llm = ckpt_dir / "LLM"
    tok = load_tokenizer(base_llm)
    refs_path = Path(qman.get("calibration_dir", exp.calibration_dir)) / REFERENCES
    refs = [json.loads(x) for x in refs_path.read_text().splitlines()] if refs_path.is_file() else []
    voices = (f"the calibration's references ({refs_path})" if refs else
              f"random global tokens (no calibration references at {refs_path})")
    prompts = eval_prompts(exp, tok, refs)
    if exp.eval.baseline_dtype == "float16":
        print("eval: WARNING: float16 baseline requested; Spark-TTS is known to produce garbage in FP16. "
              "Its outputs are checked for validity and NaN below, not trusted.", file=sys.stderr)
    inputs = {"eval": exp.eval.model_dump(mode="json"), "checkpoint": qman["files"],
              "model": model_fingerprint(model_dir), "prompts": fingerprint([p["ids"] for p in prompts])}

    if begin_stage(out, "eval", inputs, overwrite, derived, sources=[model_dir, ckpt_dir, exp.eval.heldout]):
        return out
    if qman["check"]["format"] == "float-quantized":
        ok, why = fp8_capable()
        if not ok:
            return write_skipped(exp, out, overwrite, derived, f"FP8 checkpoint and {why}", inputs, qman)
    served = {"baseline": base_llm, "quantized": quant_llm}
    if exp.eval.spark_profile:  # serve the profiles; the worker maps ids, so everything below sees original ids
        from spark_quant.models.serving_profile import build_profile

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
        if b.get("ok"):
            q = run_worker({**quant_spec, "tasks": timing_tasks(exp, prompts)
                            + similarity_tasks(exp, prompts, None if exp.eval.spark_profile else base_greedy)},
                           logs, "quantized-1", timeout)
        else:  # nothing to compare it with: no engine is started for it
            q = {"ok": False, "error": "not run: the baseline run failed", "kernels": [], "not_run": True}
        runs["quantized"].append(q)
        for rep in range(2, exp.eval.repeats + 1):
            if not (b.get("ok") and q.get("ok")):
                break
            runs["baseline"].append(cached_run({**base_spec, "tasks": timing_tasks(exp, prompts)}, inputs["model"],
                                               logs, f"baseline-{rep}", timeout, cache))
            runs["quantized"].append(run_worker({**quant_spec, "tasks": timing_tasks(exp, prompts)}, logs,
                                                f"quantized-{rep}", timeout))
        results = build_results(exp, prompts, runs, qman, base_spec["device"], read_config(base_llm))
        results["clone_voices"] = voices
        if exp.eval.audio_samples or exp.eval.audio_stream_concurrency:  # BiCodec: WAV samples, streamed first audio
            from spark_quant.audio.evalstep import audio_step

            results.update(audio_step(exp, tmp, prompts, runs, model_dir, is_proxy,
                                      {"baseline": base_spec, "quantized": quant_spec}, logs))
        if exp.eval.step_profile_concurrency:
            results["step_profile"] = {
                name: run_worker({**spec, "concurrency": exp.eval.step_profile_concurrency, "modes": ["sampled", "greedy"]},
                                 logs, f"{name}-stepprof", timeout, module="spark_quant.serving.stepprof")
                for name, spec in (("baseline", base_spec), ("quantized", quant_spec))}
        write_results(results, tmp)
        from spark_quant.reporting.report import render_plots, render_report

        render_plots(results, tmp)
        (tmp / "report.md").write_text(render_report(results))
        write_manifest(tmp, "eval", exp.model_dump(mode="json"), inputs, started,
                       extra={"verdict": results["verdict"], "checkpoint_dir": str(ckpt_dir)})
    print_summary(results, out)
    v = results["verdict"]
    if v["status"] == "FAIL":
        raise StageFailed(f"eval: {out}/report.md: " + "; ".join(v["failures"]))
    if v["status"] == "INCONCLUSIVE":
        raise Inconclusive(f"eval: {out}/report.md: INCONCLUSIVE: " + "; ".join(v["inconclusive"]))
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
    gates: list[dict[str, Any]] = []
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
        mt, k = exp.eval.similarity_max_tokens, exp.eval.samples_per_prompt
        sb = sampled_quality(b["tasks"]["sampled"]["outputs"], prompts * k, mt)
        sq = sampled_quality(q["tasks"]["sampled"]["outputs"], prompts * k, mt)
        ratios = [y / x for x, y in zip(sb["audio_seconds"], sq["audio_seconds"]) if x > 0]
        sim["sampled"] = {"baseline": sb, "quantized": sq, "samples_per_prompt": k,
                          "duration_ratio": {"mean": statistics.fmean(ratios) if ratios else None,
                                             "p5": pct(ratios, 0.05), "p95": pct(ratios, 0.95)},
                          "semantic_distribution_tv": hist_distance(sb["semantic_histogram64"],
                                                                     sq["semantic_histogram64"])}
        if sb["valid_rate"] > 0:
            sim["sampled"]["valid_rate_recovery"] = sq["valid_rate"] / sb["valid_rate"]
        res["similarity"] = sim
        res["fidelity"] = fidelity(sim, len(prompts))  # every number with n and its 95% interval
        gates = check_gates(res["fidelity"], exp.eval.model_dump())
        if exp.eval.baseline_dtype == "float16" and sb["valid_rate"] == 0:
            failures.append("float16 baseline produced no valid Spark output (known FP16 breakage); use bfloat16")
    if "baseline" in res["speed"] and "quantized" in res["speed"]:
        sb_, sq_ = res["speed"]["baseline"], res["speed"]["quantized"]
        tps, tps_rep = {}, {}  # tok/s ratio per concurrency: of the medians, and paired by repeat
        for b, q in zip(sb_["throughput"], sq_["throughput"]):
            tps[b["concurrency"]] = ratio(q["tokens_per_s"], b["tokens_per_s"])
            tps_rep[b["concurrency"]] = ratio_by_repeat(b.get("tokens_per_s_runs") or [],
                                                        q.get("tokens_per_s_runs") or [], True)
        res["ratios"] = {
            "ms_per_token_sampled": ratio(sq_["ms_per_token_sampled"], sb_["ms_per_token_sampled"]),
            "ms_per_token_greedy": ratio(sq_["ms_per_token_greedy"], sb_["ms_per_token_greedy"]),
            "tokens_per_s": tps,
            # the same ratios paired by repeat, with their 95% CI and n (none under 3 repeats)
            "by_repeat": {**{k: ratio_by_repeat(sb_.get(f"{k}_runs") or [], sq_.get(f"{k}_runs") or [], False)
                             for k in ("ms_per_token_sampled", "ms_per_token_greedy")},
                          "tokens_per_s": tps_rep},
        }
        res["roofline"] = roofline(res, model_cfg, prompt_mean + exp.eval.max_new_tokens / 2)
    res["verdict"] = verdict(gates, failures)
    return res


def print_summary(res: dict[str, Any], out: Path) -> None:
    from spark_quant.reporting.report import summary_table

    print(summary_table(res))
    print(f"report: {out / 'report.md'}")
    short = {"experiment": res["experiment"], "device": res["device"], "passed": res["verdict"]["passed"],
             "status": res["verdict"].get("status"), "failures": res["verdict"]["failures"],
             "inconclusive": res["verdict"].get("inconclusive"), "ratios": res.get("ratios"),
             "greedy_prefix_agreement": res.get("similarity", {}).get("greedy", {}).get("prefix_agreement_mean"),
             "kernels": res.get("kernel_check", {}).get("selected"), "results": str(out / "results.json")}
    print(json.dumps(short, default=str))
