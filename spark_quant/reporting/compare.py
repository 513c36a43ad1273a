"""One table and one plot for several evaluated experiments (``spark-quant compare``, ``make sweep``):
pure over each experiment's results.json and its checkpoint's manifest (``stages/sweep.py`` reads them).

Columns: fidelity against the BF16 baseline (teacher-forced top-1 agreement and KL, NLL
difference, greedy prefix agreement and exact match, sampled valid-rate recovery, semantic
histogram distance), speed ratios (quantized / baseline: ms per token at batch 1, sampled and
greedy; output tokens/s at the highest concurrency measured), weight bytes as served and
quantization time. A skipped eval (e.g. FP8 without an FP8 GPU) is a row that says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = [
    ("experiment", "experiment"),
    ("recipe", "recipe"),
    ("weights_gb", "weights GB"),
    ("quantize_s", "quantize s"),
    ("top1", "TF top-1"),
    ("kl", "TF KL"),
    ("nll_delta", "ΔNLL"),
    ("greedy_prefix", "greedy prefix"),
    ("greedy_exact", "greedy exact"),
    ("valid_recovery", "valid rate q/b"),
    ("semantic_tv", "semantic TV"),
    ("ms_sampled_ratio", "b1 ms/tok sampled q/b"),
    ("ms_greedy_ratio", "b1 ms/tok greedy q/b"),
    ("tps_ratio_max_c", "tok/s q/b @max c"),
    ("verdict", "verdict"),
]


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
    row["ms_greedy_ratio"] = ratios.get("ms_per_token_greedy")
    tps = {int(k): v for k, v in (ratios.get("tokens_per_s") or {}).items() if v is not None}
    row["max_concurrency"] = max(tps) if tps else None
    row["tps_ratio_max_c"] = tps[max(tps)] if tps else None
    row["ms_per_token_sampled"] = _get(res, "speed", "quantized", "ms_per_token_sampled")
    row["ms_per_token_sampled_baseline"] = _get(res, "speed", "baseline", "ms_per_token_sampled")
    verdict = res.get("verdict", {})
    row["verdict"] = "PASS" if verdict.get("passed") else "FAIL: " + "; ".join(verdict.get("failures", []))[:120]
    return row


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_fmt(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def render_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Teacher-forced KL (lower is better) against batch-1 sampled speed ratio, one point per experiment."""
    pts = [r for r in rows if r.get("kl") is not None and r.get("ms_sampled_ratio") is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(1.0 / r["ms_sampled_ratio"], max(r["kl"], 1e-7), s=40)
        ax.annotate(r["experiment"], (1.0 / r["ms_sampled_ratio"], max(r["kl"], 1e-7)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("batch-1 speed-up over BF16 (sampled ms/token, baseline / quantized)")
    ax.set_ylabel("teacher-forced KL(BF16 || quantized), log")
    devices = sorted({str(r.get("gpu") or r.get("device")) for r in pts})
    ax.set_title(f"fidelity vs speed ({', '.join(devices)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


