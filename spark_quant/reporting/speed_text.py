"""Batch-1 speed with its uncertainty, as lines of the eval report: each side's ms/token with its interval over
requests, and the quantized / baseline ratios paired by repeat."""

from __future__ import annotations

from typing import Any

from spark_quant.reporting.fmt import ci_text


def by_repeat_lines(ratios: dict[str, Any]) -> list[str]:
    """The batch-1 ratios paired by repeat (quantized run k against baseline run k), with CI, n and verdict."""
    by = ratios.get("by_repeat") or {}
    parts = [f"{label} {ci_text(v, '.3f', ' (no interval under 3 repeats)')}, n = {v.get('n', 0)} repeats, "
             f"{v.get('verdict')}" for label, k in (("sampled", "ms_per_token_sampled"), ("greedy", "ms_per_token_greedy"))
             if (v := by.get(k)) and v.get("median") is not None]
    return [f"Quantized / baseline ms/token paired by repeat (median of per-repeat ratios, 95% bootstrap CI over "
            f"repeats): {'; '.join(parts)}.", ""] if parts else []


def b1_interval_lines(sp: dict[str, Any]) -> list[str]:
    """Batch-1 ms/token of each side with its 95% bootstrap interval over requests (every repeat pooled)."""
    def cell(c: dict[str, Any] | None) -> str:
        text = ci_text(c, ".3f", " (no interval under 3 requests)")
        return text if text == "–" else f"{text}, n = {c['n']}"

    rows = [(label, sp.get("baseline", {}).get(key), sp.get("quantized", {}).get(key))
            for label, key in (("ms/token, sampled", "ms_per_token_sampled_ci"),
                               ("ms/token, greedy", "ms_per_token_greedy_ci"))]
    if not any(b or q for _, b, q in rows):
        return []
    out = ["Batch-1 ms/token with 95% intervals: the median over requests, every repeat pooled, bootstrap over "
           "requests (n = requests). Each side is its own run, one after the other, so the ratio above is not "
           "the paired method and ranks nothing; `make sweep ... PAIRED_SPEED=...` times the variants paired.", "",
           "| | baseline median [95% CI], n | quantized median [95% CI], n |", "|---|---|---|"]
    out += [f"| {label} | {cell(b)} | {cell(q)} |" for label, b, q in rows]
    return out + [""]
