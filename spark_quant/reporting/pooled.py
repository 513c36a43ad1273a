"""One paired ratio measured on several machines, pooled into one estimate whose interval covers the machines.

A paired run's interval covers the noise between its own rounds, not the spread between machines: the same
W8A8 / BF16 comparison on three H200s (other hosts, other resident engines) gave saturation ratios of 0.915-0.948,
each with a CI of +-0.5-1.3%. Pooling is a random-effects meta-analysis of the runs (statsmodels'
``combine_effects``): each run is one estimate of log(ratio), its standard error read from its own paired
bootstrap CI, and the machines may differ by a between-machine standard deviation tau (Paule-Mandel). The
pooled interval is the Hartung-Knapp t interval over k - 1 degrees of freedom, never narrower than the plain
random-effects one; the prediction interval (k >= 3) is where the next machine's ratio should fall.

Pure: paired.json dicts in, numbers out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spark_quant.reporting import speed_stats as stats
from spark_quant.reporting.paired import metric_of


def run_ratio(res: dict[str, Any], cell: str, of: str, to: str, name: str) -> dict[str, Any]:
    """``of`` / ``to`` in one run's ``cell``, recomputed from its raw rounds (the run's own paired method), with the
    standard error of its log from its 95% interval. ValueError (one line) when the run lacks the cell or a label."""
    c = (res.get("cells") or {}).get(cell)
    if c is None:
        raise ValueError(f"{name}: no cell {cell!r} (cells: {', '.join(res.get('cells') or {}) or 'none'})")
    missing = [lb for lb in (of, to) if lb not in c["labels"]]
    if missing:
        raise ValueError(f"{name}: cell {cell} has no variant {', '.join(missing)} (it has {', '.join(c['labels'])})")
    from scipy.stats import norm

    key, hib = metric_of(c["concurrency"])
    series = {lb: [rnd["trials"][lb].get(key) for rnd in c["raw"]] for lb in (of, to)}
    r = stats.paired_ratio(series[to], series[of], hib)
    if r["lo"] is None or r["lo"] <= 0:
        raise ValueError(f"{name}: cell {cell} has too few rounds for an interval (n = {r['n']})")
    host = res.get("host") or {}
    model = ((res.get("variants") or {}).get(to) or {}).get("path") or ""
    return {"name": name, "device": host.get("gpu") or host.get("host_cpu"), "created": res.get("created"),
            "model": "/".join(model.rstrip("/").split("/")[-2:]),
            "commit": (res.get("git_commit") or "")[:12], "engines": sum(len(v.get("engines") or [])
                                                                     for v in (res.get("variants") or {}).values()),
            "metric": key, "higher_is_better": hib, **r,
            "log": math.log(r["median"]),
            "se": (math.log(r["hi"]) - math.log(r["lo"])) / (2 * norm.ppf(0.5 + stats.CONFIDENCE / 2))}


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' ratios (``run_ratio``) pooled: ratio, 95% interval, verdict, tau, I^2, the prediction interval,
    and the pairwise two-machine check (each median inside the other's CI and within 5%)."""
    from scipy.stats import t as student_t
    from statsmodels.stats.meta_analysis import combine_effects

    k = len(runs)
    if k < 2:
        raise ValueError(f"pooling needs at least 2 runs of the comparison, got {k}")
    y = np.array([r["log"] for r in runs])
    v = np.array([max(r["se"], 1e-12) ** 2 for r in runs])
    res = combine_effects(y, v, method_re="pm", use_t=True, row_names=[r["name"] for r in runs])
    m, tau2 = float(res.mean_effect_re), float(max(res.tau2, 0.0))
    half = student_t.ppf(0.975, k - 1) * max(float(res.sd_eff_w_re), float(res.sd_eff_w_re_hksj))
    lo, hi = math.exp(m - half), math.exp(m + half)
    out = {"k": k, "ratio": math.exp(m), "lo": lo, "hi": hi, "n": sum(r["n"] for r in runs),
           "verdict": stats.verdict(lo, hi, math.exp(m), runs[0]["higher_is_better"]),
           "tau": math.sqrt(tau2), "tau_percent": 100 * (math.exp(math.sqrt(tau2)) - 1), "i2": max(0.0, float(res.i2)),
           "q": float(res.q), "q_pvalue": float(res.test_homogeneity().pvalue),
           "method": "random effects (Paule-Mandel tau^2), Hartung-Knapp t interval over k - 1 df"}
    if k >= 3:  # Higgins, Thompson & Spiegelhalter (2009): where the next machine's ratio should fall
        ph = student_t.ppf(0.975, k - 2) * math.sqrt(tau2 + float(res.sd_eff_w_re) ** 2)
        out["prediction"] = {"lo": math.exp(m - ph), "hi": math.exp(m + ph)}
    out["pairs"] = [{"a": a["name"], "b": b["name"], **stats.intervals_agree(a, b)}
                    for i, a in enumerate(runs) for b in runs[i + 1:]]
    return out


def render_markdown(title: str, cells: dict[str, dict[str, Any]]) -> str:
    """One section per cell: the runs, the pooled row, the spread between machines and the pairwise check."""
    intro = ("Each run's ratio is the median of its per-round ratios with its paired 95% bootstrap CI. The pooled "
             "ratio is a random-effects meta-analysis of the runs' log ratios (Paule-Mandel between-machine "
             "variance tau^2, Hartung-Knapp t interval over k - 1 degrees of freedom): its interval covers the "
             "spread between machines. 'no difference' when an interval contains 1.0.")
    lines = [f"# {title}", "", intro, ""]
    for cell, c in cells.items():
        runs, p = c["runs"], c["pooled"]
        unit = "ms/token" if runs[0]["metric"] == "ms_per_token" else "tokens/s"
        lines += [f"## {c['of']} / {c['to']}, cell {cell} ({unit})", ""]
        for what in ("device", "model"):
            if len({r[what] for r in runs}) > 1:
                values = ", ".join(sorted({str(r[what]) for r in runs}))
                lines += [f"The runs differ in {what} ({values}): the spread between them includes the {what}'s effect.",
                          ""]
        lines += [
                  "| run | device | model | created | commit | engines resident | ratio [95% CI] | n | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['name']} | {r['device']} | {r['model']} | {r['created']} | {r['commit']} | "
                         f"{r['engines']} | {r['median']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['n']} | {r['verdict']} |")
        lines.append(f"| **pooled, {p['k']} runs** | | | | | | **{p['ratio']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]** | "
                     f"{p['n']} | **{p['verdict']}** |")
        pred = (f"; the next machine's ratio, 95% prediction interval: [{p['prediction']['lo']:.3f}, "
                f"{p['prediction']['hi']:.3f}]" if "prediction" in p else "")
        spread = (f"Between machines: tau = {p['tau_percent']:.1f}% of the ratio, I^2 = {100 * p['i2']:.0f}% of the "
                  f"variation, Cochran's Q = {p['q']:.1f} (p = {p['q_pvalue']:.2g}){pred}.")
        lines += ["", spread, "",
                  "| pair | each median inside the other's CI | medians apart | within 5% |", "|---|---|---|---|"]
        for q in p["pairs"]:
            rel = "–" if q["relative_difference"] is None else f"{100 * q['relative_difference']:.1f}%"
            lines.append(f"| {q['a']} vs {q['b']} | {_yes(q['inside_each_other'])} | {rel} | {_yes(q['within'])} |")
        lines.append("")
    return "\n".join(lines)


def _yes(flag: bool | None) -> str:
    return "–" if flag is None else ("yes" if flag else "**no**")


def plot_forest(cells: dict[str, dict[str, Any]], path) -> None:
    """Each cell's runs and pooled ratio with their intervals, one panel per cell (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 0.5 * max(len(c["runs"]) for c in
                                                                               cells.values()) + 2.2), squeeze=False)
    for ax, (cell, c) in zip(axes[0], cells.items()):
        rows = [(r["name"], r["median"], r["lo"], r["hi"]) for r in c["runs"]]
        p = c["pooled"]
        rows.append((f"pooled ({p['k']})", p["ratio"], p["lo"], p["hi"]))
        ys = list(range(len(rows), 0, -1))
        for y, (name, med, lo, hi) in zip(ys, rows):
            pooled = name.startswith("pooled")
            ax.errorbar(med, y, xerr=[[med - lo], [hi - med]], fmt="D" if pooled else "o", capsize=3,
                        color="black" if pooled else "tab:blue")
        if "prediction" in p:
            ax.hlines(ys[-1] - 0.3, p["prediction"]["lo"], p["prediction"]["hi"], color="grey", lw=1,
                      label="prediction, next machine")
            ax.legend(fontsize=7, loc="best")
        ax.axvline(1.0, ls=":", color="grey")
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_title(f"{c['of']} / {c['to']}, {cell}", fontsize=9)
        ax.set_xlabel("ratio (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
