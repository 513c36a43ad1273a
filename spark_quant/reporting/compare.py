"""One table and one plot for several evaluated experiments (``spark-quant compare``, ``make sweep``):
pure over each experiment's results.json and its checkpoint's manifest (``stages/sweep.py`` reads them).

Columns: fidelity against the BF16 baseline (teacher-forced top-1 agreement and KL, NLL
difference, greedy prefix agreement and exact match, sampled valid-rate recovery, semantic
histogram distance), speed ratios (quantized / baseline: ms per token at batch 1, sampled and
greedy; output tokens/s at the highest concurrency measured), weight bytes as served and
quantization time. A skipped eval (e.g. FP8 without an FP8 GPU) is a row that says why.

With a paired speed run (``add_paired``: BF16 and every checkpoint resident together, rounds alternated), each
of its cells is one more column: the recipe's ratio to BF16 as the median of per-round ratios with its paired
95% CI, n and verdict. Those columns rank; the evals' own speed columns are one unpaired run each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spark_quant.reporting import stats
from spark_quant.reporting.fmt import auto as _fmt
from spark_quant.reporting.fmt import ci_text
from spark_quant.reporting.gates import verdict_line
from spark_quant.reporting.metrics import METRICS, PAIRED_KEYS, format_ci
from spark_quant.reporting.speed_stats import by_concurrency

DEFAULT_EXPERIMENT = "spark-tts_w8a8_int8"

COLUMNS = ["experiment", "recipe", "weights_gb", "quantize_s", "top1", "kl", "nll_delta", "greedy_prefix",
           "greedy_exact", "valid_recovery", "semantic_tv", "ms_sampled_ratio", "ms_greedy_ratio", "tps_ratio_max_c",
           "verdict"]  # labels, units and directions: metrics.METRICS


def row_from_results(res: dict[str, Any], qman: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    """One comparison row from an eval's results.json and its checkpoint's manifest (None if gone)."""
    ckpt = res.get("checkpoint", {})
    row: dict[str, Any] = {"experiment": res.get("experiment", folder.name), "folder": str(folder),
                           "recipe": Path(ckpt.get("recipe") or "?").stem, "device": res.get("device"),
                           "gpu": _get(res, "host", "gpu")}
    total = _get(ckpt, "weights", "total_bytes")
    row["weights_gb"] = total / 1e9 if total else None
    row["quantize_s"] = _get(qman, "timings", "oneshot_s") if qman else None
    if res.get("skipped"):
        row["verdict"] = f"skipped: {res['skipped']}"
        return row
    sim = res.get("similarity", {})
    row["top1"] = _get(sim, "teacher_forced", "top1_agreement")
    row["kl"] = _get(sim, "teacher_forced", "kl_base_quant_mean")
    row["nll_delta"] = _get(sim, "teacher_forced", "nll_delta_mean")
    row["greedy_prefix"] = _get(sim, "greedy", "prefix_agreement_mean")
    row["greedy_exact"] = _get(sim, "greedy", "exact_match_rate")
    row["valid_recovery"] = _get(sim, "sampled", "valid_rate_recovery")
    row["valid_rate"] = _get(sim, "sampled", "quantized", "valid_rate")
    row["valid_rate_baseline"] = _get(sim, "sampled", "baseline", "valid_rate")
    row["semantic_tv"] = _get(sim, "sampled", "semantic_distribution_tv")
    ratios = res.get("ratios") or {}
    row["ms_sampled_ratio"] = ratios.get("ms_per_token_sampled")
    by_rep = ratios.get("by_repeat") or {}  # the same ratios paired by repeat: CI and n where repeats >= 3
    row["speed_ci"] = {col: by_rep[k] for col, k in (("ms_sampled_ratio", "ms_per_token_sampled"),
                                                      ("ms_greedy_ratio", "ms_per_token_greedy")) if by_rep.get(k)}
    row["ms_greedy_ratio"] = ratios.get("ms_per_token_greedy")
    tps = {k: v for k, v in by_concurrency(ratios.get("tokens_per_s")).items() if v is not None}
    row["max_concurrency"] = max(tps) if tps else None
    row["tps_ratio_max_c"] = tps[max(tps)] if tps else None
    tps_rep = by_concurrency(by_rep.get("tokens_per_s"))
    if tps and tps_rep.get(max(tps)):
        row["speed_ci"]["tps_ratio_max_c"] = tps_rep[max(tps)]
    row["ms_per_token_sampled"] = _get(res, "speed", "quantized", "ms_per_token_sampled")
    row["ms_per_token_sampled_baseline"] = _get(res, "speed", "baseline", "ms_per_token_sampled")
    fid = res.get("fidelity") or {}
    row["ci"] = {k: {x: v.get(x) for x in ("value", "low", "high", "n", "method")} for k, v in fid.items()
                 if k != "per_prompt" and isinstance(v, dict)}
    for k, ci in row["ci"].items():  # the interval's point estimate is the column's value
        if k in METRICS and ci.get("value") is not None:
            row[k] = ci["value"]
    row["per_prompt"] = fid.get("per_prompt") or {}
    row["prompts"] = [p.get("text") for p in res.get("prompts") or []]
    row["seeds"] = _get(res, "settings", "samples_per_prompt")
    row["verdict"] = verdict_line(res.get("verdict", {}))[:160]
    return row


def add_paired(rows: list[dict[str, Any]], pres: dict[str, Any], baseline: str) -> None:
    """Put each row's paired ratios to ``baseline`` (``paired.json``'s cells) in ``row["paired"]``."""
    for r in rows:
        r["paired"] = {}
        for name, c in (pres.get("cells") or {}).items():
            st = c.get("stats") or {}
            hit = next((x for x in st.get("ratios", []) if x.get("to") == baseline and x.get("of") == r["experiment"]),
                       None)
            if hit is not None:
                r["paired"][name] = {"metric": st.get("metric"), "concurrency": c.get("concurrency"),
                                     "tokens": c.get("tokens"), **{k: hit.get(k) for k in
                                                                   ("median", "lo", "hi", "n", "verdict")}}


def _paired_cells(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(cell name, metric) of every paired cell any row has, in the run's order."""
    seen: dict[str, str] = {}
    for r in rows:
        for name, v in (r.get("paired") or {}).items():
            seen.setdefault(name, v.get("metric") or "")
    return list(seen.items())


def _ratio_text(v: dict[str, Any] | None) -> str:
    text = ci_text(v)
    return text if text == "–" else f"{text} n={v['n']} {v.get('verdict', '')}".rstrip()


def paired_cells_text(pres: dict[str, Any], baseline: str) -> str:
    """What the paired columns are (device, cells, trials, engines), the ratios between the quantized recipes
    themselves (the default recipe's row against each other), and any variant that did not start."""
    host = pres.get("host") or {}
    cells = pres.get("cells") or {}
    parts = [f"**Paired speed** ({host.get('gpu') or host.get('host_cpu') or '?'}, commit "
             f"{str(pres.get('git_commit'))[:7]}, status {pres.get('status')}): {baseline} and every checkpoint "
             f"resident together, one engine each, {pres.get('trials')} rounds per cell after an untimed one, the "
             "order reversed every other round; a ratio is quantized / BF16, the median of per-round ratios with a "
             "paired 95% bootstrap CI; 'no difference' when it contains 1.0. Cells: " + "; ".join(
                 f"`{n}` = concurrency {c.get('concurrency')}, {c.get('tokens')} tokens, "
                 f"{'ms/token (lower is better)' if (c.get('stats') or {}).get('metric') == 'ms_per_token' else 'output tokens/s (higher is better)'}"
                 for n, c in cells.items()) + ". Raw rounds: paired.json; per-variant medians: paired.md."]
    ref = DEFAULT_EXPERIMENT
    between = []
    for n, c in cells.items():
        for x in (c.get("stats") or {}).get("ratios", []):
            if ref in (x.get("to"), x.get("of")) and baseline not in (x.get("to"), x.get("of")):
                between.append(f"| {n} | {x['of']} / {x['to']} | {_ratio_text(x)} |")
    if between:
        parts += ["", "Between the recipes (same rounds):", "", "| cell | ratio | median [95% CI] n verdict |",
                  "|---|---|---|", *between]
    for lb, err in (pres.get("failed_variants") or {}).items():
        parts += ["", f"Not measured: `{lb}` did not start ({str(err)[:200]})."]
    return "\n".join(parts)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def reference_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row the others are tested against: the default recipe's experiment if present, else the first
    row with fidelity numbers."""
    measured = [r for r in rows if r.get("ci")]
    return next((r for r in measured if r["experiment"] == DEFAULT_EXPERIMENT), measured[0] if measured else None)


def differences(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each fidelity metric of ``row`` minus ``ref``'s, with a 95% interval: paired over prompts when both
    were measured on the same prompts and seeds (per-prompt samples kept), else None bounds, and then
    ``significant`` falls back to whether the two rows' own intervals overlap."""
    out = {}
    paired = row.get("prompts") and row.get("prompts") == ref.get("prompts") and row.get("seeds") == ref.get("seeds")
    for key in PAIRED_KEYS:
        a, b = (ref.get("per_prompt") or {}).get(key), (row.get("per_prompt") or {}).get(key)
        if paired and a and b:
            d = stats.paired_pooled_diff(a, b)
        else:
            ca, cb = (ref.get("ci") or {}).get(key) or {}, (row.get("ci") or {}).get(key) or {}
            ov = stats.overlap(ca, cb)
            d = stats.interval(None, None, None, 0, "interval overlap") | {"overlap": ov}
        out[key] = d
    return out


def is_significant(d: dict[str, Any]) -> bool | None:
    if "overlap" in d:
        return None if d["overlap"] is None else not d["overlap"]
    return stats.significant(d)


def _cell(r: dict[str, Any], key: str, diffs: dict[str, dict[str, Any]] | None) -> str:
    m = METRICS.get(key)
    ci = (r.get("ci") or {}).get(key)
    sp = (r.get("speed_ci") or {}).get(key)
    if m and ci and ci.get("value") is not None:
        text = format_ci(ci, m.fmt if abs(ci["value"]) >= 1e-3 or ci["value"] == 0 else ".1e", n=False)
    elif sp and sp.get("lo") is not None and sp.get("median") is not None:  # the eval's repeats: paired CI
        text = f"{ci_text(sp)} n={sp['n']} runs"
    elif sp and r.get(key) is not None:  # under 3 repeats: the ratio, and why it has no interval
        k = sp.get("n", 0)
        text = f"{_fmt(r.get(key))} (n={k} run{'' if k == 1 else 's'}, no CI)"
    else:
        text = _fmt(r.get(key))
    if diffs and key in diffs and is_significant(diffs[key]):
        text += " *"
    return text


def render_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table with each fidelity number's 95% interval; ``*`` marks a difference from the
    reference row that is significant (its 95% interval excludes 0)."""
    label = {k: (METRICS[k].label if k in METRICS else k) for k in COLUMNS}
    pcells = _paired_cells(rows)
    plabels = [f"paired {n}: {'ms/tok' if m == 'ms_per_token' else 'tok/s'} q/b [95% CI]" for n, m in pcells]
    head = "| " + " | ".join([label[k] for k in COLUMNS[:-1]] + plabels + [label[COLUMNS[-1]]]) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + len(pcells))
    ref = reference_row(rows)
    body = []
    for r in rows:
        diffs = differences(r, ref) if ref is not None and r is not ref and r.get("ci") else None
        cells = [_cell(r, k, diffs) for k in COLUMNS]
        cells[-1:-1] = [_ratio_text((r.get("paired") or {}).get(n)) for n, _ in pcells]
        body.append("| " + " | ".join(cells) + " |")
    notes = []
    if ref is not None:
        n = (ref.get("ci", {}).get("top1") or ref.get("ci", {}).get("greedy_prefix") or {}).get("n")
        notes = ["", f"Values are point estimates [95% interval]; n = {n} prompts (bootstrap) or the outputs of a rate "
                 f"(Wilson). `*` = differs from `{ref['experiment']}` significantly (paired bootstrap over the same "
                 "prompts and seeds, 95% interval of the difference excludes 0; rows measured on other prompts: "
                 "non-overlapping intervals). Unmarked differences are within the noise at this n."]
    if pcells:
        notes.append("The `paired` columns come from one paired speed run and rank; the b1 / tok/s ratio columns "
                     "before them are each eval's own runs and rank nothing.")
    if any(r.get("speed_ci") for r in rows):
        notes.append("The eval's own ratios (b1 ms/token, tok/s at the highest concurrency) are paired by repeat "
                     "(each quantized run right after its baseline run, one engine launch each): the median of per-repeat ratios with a 95% bootstrap CI over "
                     "repeats where there are 3 or more, else the ratio of medians and no interval. Repeats are "
                     "minutes apart, so they carry the drift between launches the paired columns cancel.")
    return "\n".join([head, sep, *body, *notes])


def significance_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each row, which fidelity metrics differ significantly from the reference row and which do not."""
    ref = reference_row(rows)
    out = []
    for r in rows:
        if ref is None or r is ref or not r.get("ci"):
            continue
        diffs = differences(r, ref)
        out.append({"experiment": r["experiment"], "reference": ref["experiment"],
                    "significant": [k for k, d in diffs.items() if is_significant(d)],
                    "not_significant": [k for k, d in diffs.items() if is_significant(d) is False],
                    "differences": diffs})
    return out


def render_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Teacher-forced KL (lower is better) against batch-1 speed, one point per experiment: the paired batch-1
    ratio with its 95% CI as an error bar where a paired run measured one, else the eval's own ratio."""
    def b1(r: dict[str, Any]) -> dict[str, Any] | None:
        v = next((v for v in (r.get("paired") or {}).values()
                  if v.get("metric") == "ms_per_token" and v.get("median")), None)
        if v is not None:
            return {"x": 1.0 / v["median"], "lo": 1.0 / v["hi"] if v.get("hi") else None,
                    "hi": 1.0 / v["lo"] if v.get("lo") else None, "paired": True}
        return {"x": 1.0 / r["ms_sampled_ratio"], "paired": False} if r.get("ms_sampled_ratio") else None

    pts = [(r, b) for r in rows if r.get("kl") is not None and (b := b1(r)) is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, b in pts:
        y = max(r["kl"], 1e-7)
        if b["paired"] and b.get("lo") is not None:
            ax.errorbar(b["x"], y, xerr=[[b["x"] - b["lo"]], [b["hi"] - b["x"]]], fmt="o", ms=6, capsize=3)
        else:
            ax.scatter(b["x"], y, s=40)
        ax.annotate(r["experiment"], (b["x"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    paired = any(b["paired"] for _, b in pts)
    ax.set_xlabel("batch-1 speed-up over BF16 (ms/token, baseline / quantized" +
                  ("; paired run, 95% CI)" if paired else "; one unpaired run each)"))
    ax.set_ylabel("teacher-forced KL(BF16 || quantized), log")
    devices = sorted({str(r.get("gpu") or r.get("device")) for r, _ in pts})
    ax.set_title(f"fidelity vs speed ({', '.join(devices)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


