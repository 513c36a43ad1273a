"""Metrics computed from worker results: latency, throughput, similarity, sampled-output quality, roofline.

Pure functions over result dicts (no vLLM, no model): the eval stage, the GPU scripts and the tests call them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from spark_quant import spark
from spark_quant.reporting import speed_stats, stats
from spark_quant.reporting.stats import median, pct, summary


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
        "ttft_s": summary(ttft),
        "ms_per_token": {k: (v * 1000 if isinstance(v, float) else v) for k, v in summary(tpot).items()},
        "ms_per_token_samples": [v * 1000 for v in tpot],  # one per request: the intervals are over these
        "itl_ms": {k: (v * 1000 if isinstance(v, float) else v) for k, v in summary(itl).items()},
        "rtf": summary(rtf),
        "time_to_first_audio_s": summary(first_audio),
        "request_s": summary(total),
        # from request start until 50 *semantic* tokens (1 s of audio) exist; None where a request never got there
        "first_audio_by_mode_s": {m: {"p50": pct([x for x in xs if x is not None], 0.5),
                                      "reached": sum(x is not None for x in xs), "requests": len(xs)}
                                  for m, xs in by_mode.items()},
        "output_tokens": summary([st[-1][1] for st in (r["stamps"] for r in task["requests"]) if st]),
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
            "rtf_p50": pct(rtf, 0.5),
            "rtf_p99": pct(rtf, 0.99),
            "ttft_p99_s": pct([r["ttft"] for r in reqs], 0.99),
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
        "per_prompt": {"prefix": prefix, "exact": [int(x) for x in exact], "token": pos_agree},
    }


def teacher_forced(base_self: list[list[dict]], quant: list[list[dict]], base_tokens: list[list[int]],
                   vocab: int = spark.VOCAB_SIZE) -> dict[str, Any]:
    """Top-1 agreement, KL(base||quant) over the base top-k plus a tail bucket, NLL difference."""
    top1, kls, dnll = [], [], []
    per: dict[str, list[float]] = {"top1": [], "kl": [], "positions": [], "nll": [], "nll_positions": []}
    for bp, qp, toks in zip(base_self, quant, base_tokens):
        marks = (len(top1), len(kls), len(dnll))
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
        per["top1"].append(sum(top1[marks[0]:]))
        per["kl"].append(sum(kls[marks[1]:]))
        per["positions"].append(len(top1) - marks[0])
        per["nll"].append(sum(dnll[marks[2]:]))
        per["nll_positions"].append(len(dnll) - marks[2])
    return {"top1_agreement": statistics.fmean(top1) if top1 else None,
            "kl_base_quant_mean": statistics.fmean(kls) if kls else None,
            "kl_base_quant_p99": pct(kls, 0.99),
            "nll_delta_mean": statistics.fmean(dnll) if dnll else None,
            "positions": len(top1), "per_prompt": per}


def sampled_quality(outputs: list[dict], prompts: list[dict], max_tokens: int) -> dict[str, Any]:
    parsed = [spark.parse_ids(o["tokens"], p["mode"]) for o, p in zip(outputs, prompts)]
    sem_hist = [0] * 64
    for s in parsed:
        for t in s.semantic_tokens:
            sem_hist[t * 64 // spark.SEMANTIC_CODEBOOK] += 1
    return {
        "valid": [int(p.valid) for p in parsed],
        "finished": [int(p.finished) for p in parsed],
        "valid_rate": sum(p.valid for p in parsed) / len(parsed),
        "runaway_rate": sum(not p.finished for p in parsed) / len(parsed),
        "audio_seconds": [p.audio_seconds for p in parsed],
        "problems": sorted({pr for p in parsed for pr in p.problems}),
        "semantic_histogram64": sem_hist,
    }


def hist_distance(a: list[int], b: list[int]) -> float | None:
    sa, sb = sum(a), sum(b)
    if not sa or not sb:
        return None
    return 0.5 * sum(abs(x / sa - y / sb) for x, y in zip(a, b))  # total variation distance


def _throughput_rows(runs: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Median over repeats of each throughput row, with every repeat's tokens/s kept."""
    thr = [throughput_metrics(r["tasks"][task]) for r in runs if task in r["tasks"]]
    if not thr:
        return []
    return [{k: (median([t[i][k] for t in thr]) if k != "concurrency" else row[k]) for k in row}
            | {"tokens_per_s_runs": [t[i]["tokens_per_s"] for t in thr]} for i, row in enumerate(thr[0])]


def max_concurrency_under(rows: list[dict[str, Any]], target: float) -> int | None:
    ok = [r["concurrency"] for r in rows if r.get("rtf_p99") is not None and r["rtf_p99"] < target]
    return max(ok) if ok else None


def _pooled_ci(lat: list[dict[str, Any]]) -> dict[str, Any]:
    return speed_stats.median_ci([x for m in lat for x in m.get("ms_per_token_samples") or []])


def speed_summary(runs: list[dict[str, Any]], rtf_target: float) -> dict[str, Any]:
    """Median over repeats of each timing metric."""
    lat = [latency_metrics(r["tasks"]["latency"]) for r in runs]
    latg = [latency_metrics(r["tasks"]["latency_greedy"]) for r in runs]
    med = median
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
        "ms_per_token_greedy_runs": [m["ms_per_token"]["p50"] for m in latg],
        # the requests of every repeat pooled: median with its 95% bootstrap interval and n (requests)
        "ms_per_token_sampled_ci": _pooled_ci(lat),
        "ms_per_token_greedy_ci": _pooled_ci(latg),
        "ttft_s": med([m["ttft_s"]["p50"] for m in lat]),
        "itl_ms_p50": med([m["itl_ms"]["p50"] for m in lat]),
        "itl_ms_p90": med([m["itl_ms"]["p90"] for m in lat]),
        "itl_ms_p99": med([m["itl_ms"]["p99"] for m in lat]),
        "time_to_first_audio_s": med([m["time_to_first_audio_s"]["p50"] for m in lat]),
        "rtf_b1": med([m["rtf"]["p50"] for m in lat]),
        "latency_runs": lat,
        "throughput": rows,
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def ratio_by_repeat(base_runs: list[float | None], quant_runs: list[float | None], higher_is_better: bool) -> dict[str, Any]:
    """The eval's own quantized / baseline ratio, paired by repeat (each quantized run follows its baseline run:
    A B A B): the median of per-repeat ratios with a 95% paired bootstrap CI, n = repeats, and a verdict; under 3
    repeats there is no interval and the verdict says so."""
    n = min(len(base_runs), len(quant_runs))
    return speed_stats.paired_ratio(list(base_runs[:n]), list(quant_runs[:n]), higher_is_better)


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


# --- the metric table -------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One reported number: ``higher_is_better`` None = closer to ``target`` is better; ``gate`` = the
    ``eval.*`` field holding its threshold (a minimum if higher is better, a maximum if lower is better, a
    tolerance around ``target`` if neither)."""

    key: str
    label: str
    unit: str
    higher_is_better: bool | None
    fmt: str = ".3f"
    gate: str | None = None
    target: float | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)  # every value it can take (an unknown interval is this)


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("weights_gb", "weights GB", "GB", False, ".3f"),
    Metric("quantize_s", "quantize s", "s", False, ".1f"),
    Metric("top1", "TF top-1", "share of positions", True, ".3f", gate="min_top1_agreement",
           bounds=(0.0, 1.0)),
    Metric("kl", "TF KL", "nats/token", False, ".4f", gate="max_kl", bounds=(0.0, math.inf)),
    Metric("nll_delta", "ΔNLL", "nats/token", None, "+.4f", target=0.0),
    Metric("greedy_prefix", "greedy prefix", "share of tokens", True, ".3f", gate="min_greedy_prefix_agreement",
           bounds=(0.0, 1.0)),
    Metric("greedy_exact", "greedy exact", "share of prompts", True, ".3f"),
    Metric("valid_rate", "valid rate", "share of outputs", True, ".3f"),
    Metric("valid_rate_baseline", "valid rate (BF16)", "share of outputs", True, ".3f"),
    Metric("valid_recovery", "valid rate q/b", "ratio", True, ".3f", gate="min_valid_rate_recovery",
           bounds=(0.0, math.inf)),
    Metric("valid_diff", "valid rate q−b", "rate difference", None, "+.3f", gate="max_valid_rate_diff", target=0.0,
           bounds=(-1.0, 1.0)),
    Metric("runaway_rate", "runaway rate", "share of outputs", False, ".3f"),
    Metric("duration_ratio", "duration q/b", "ratio", None, ".3f", gate="max_duration_deviation", target=1.0,
           bounds=(0.0, math.inf)),
    Metric("semantic_tv", "semantic TV", "total variation", False, ".3f"),
    Metric("ms_sampled_ratio", "b1 ms/tok sampled q/b", "ratio", False, ".3f"),
    Metric("ms_greedy_ratio", "b1 ms/tok greedy q/b", "ratio", False, ".3f"),
    Metric("tps_ratio_max_c", "tok/s q/b @max c", "ratio", True, ".3f"),
)}


# the fidelity numbers with per-prompt samples (compare's paired significance tests pairs them by prompt)
PAIRED_KEYS = ("top1", "kl", "nll_delta", "greedy_prefix", "greedy_exact", "valid_rate", "runaway_rate",
               "duration_ratio")


def _per_prompt_mean(xs: list[float | None], n_prompts: int) -> list[float | None]:
    """Outputs are ordered seed-major (output j belongs to prompt j % n_prompts): each prompt's mean of the
    values that are not None (None where it has none)."""
    by: list[list[float]] = [[] for _ in range(n_prompts)]
    for j, x in enumerate(xs):
        if x is not None:
            by[j % n_prompts].append(x)
    return [statistics.fmean(v) if v else None for v in by]


def fidelity(sim: dict[str, Any], n_prompts: int) -> dict[str, Any]:
    """Every fidelity number of an eval with n and a 95% interval (``stats``), keyed as ``METRICS``, plus the
    per-prompt samples behind them (``per_prompt``: {key: {"sum": [...], "count": [...]}}, one entry a prompt)."""
    out: dict[str, Any] = {}
    per: dict[str, dict[str, list[float]]] = {}
    g = (sim.get("greedy") or {}).get("per_prompt")
    if g:
        for key, src in (("greedy_prefix", "prefix"), ("greedy_exact", "exact")):
            per[key] = {"sum": list(g[src]), "count": [1] * len(g[src])}
        out["greedy_prefix"] = stats.mean_ci(g["prefix"])
        out["greedy_exact"] = stats.rate_ci(sum(g["exact"]), len(g["exact"]))  # one greedy output a prompt
    tf = (sim.get("teacher_forced") or {}).get("per_prompt")
    if tf:
        for key, src, cnt in (("top1", "top1", "positions"), ("kl", "kl", "positions"),
                              ("nll_delta", "nll", "nll_positions")):
            per[key] = {"sum": tf[src], "count": tf[cnt]}
            out[key] = stats.pooled_mean_ci(tf[src], tf[cnt])
    sb, sq = (sim.get("sampled") or {}).get("baseline"), (sim.get("sampled") or {}).get("quantized")
    if sb and sq and "valid" in sb:
        out["valid_rate"] = stats.rate_ci(sum(sq["valid"]), len(sq["valid"]))
        out["valid_rate_baseline"] = stats.rate_ci(sum(sb["valid"]), len(sb["valid"]))
        out["runaway_rate"] = stats.rate_ci(len(sq["finished"]) - sum(sq["finished"]), len(sq["finished"]))
        out["runaway_rate_baseline"] = stats.rate_ci(len(sb["finished"]) - sum(sb["finished"]), len(sb["finished"]))
        vb, vq = _per_prompt_mean(sb["valid"], n_prompts), _per_prompt_mean(sq["valid"], n_prompts)
        out["valid_recovery"] = stats.paired_ci(vb, vq, "ratio")
        out["valid_diff"] = stats.paired_ci(vb, vq, "diff")
        per["valid_rate"] = {"sum": vq, "count": [1] * len(vq)}
        per["runaway_rate"] = {"sum": [1 - x for x in _per_prompt_mean(sq["finished"], n_prompts)],
                               "count": [1] * n_prompts}
        ratios = [y / x if x > 0 else None for x, y in zip(sb["audio_seconds"], sq["audio_seconds"])]
        by = _per_prompt_mean(ratios, n_prompts)
        out["duration_ratio"] = stats.mean_ci(by) | {"p5": stats.pct(ratios, 0.05), "p95": stats.pct(ratios, 0.95)}
        per["duration_ratio"] = {"sum": [x if x is not None else 0.0 for x in by],
                                 "count": [1 if x is not None else 0 for x in by]}
        tv = (sim.get("sampled") or {}).get("semantic_distribution_tv")
        out["semantic_tv"] = stats.interval(tv, None, None, len(sq["valid"]), "point estimate (histogram)")
    out["per_prompt"] = per
    return out


def format_ci(ci: dict[str, Any] | None, fmt: str = ".3f", n: bool = True) -> str:
    """'0.998 [0.995, 1.000] n=12' (the interval left out where there is none)."""
    if not ci or ci.get("value") is None:
        return "–"
    s = format(ci["value"], fmt)
    if ci.get("low") is not None and ci.get("high") is not None:
        s += f" [{ci['low']:{fmt}}, {ci['high']:{fmt}}]"
    return s + (f" n={ci['n']}" if n and ci.get("n") is not None else "")


def direction(m: Metric) -> str:
    if m.higher_is_better is None:
        return f"closer to {m.target:g} is better" if m.target is not None else "–"
    return "higher is better" if m.higher_is_better else "lower is better"
