"""Summary statistics of raw samples and their confidence intervals (scipy bootstrap, statsmodels Wilson).

Pure: numbers in, numbers out; the eval stage, compare and the gates use them through ``metrics.py``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np


def pct(xs: list[float | None], q: float) -> float | None:
    """The q-quantile (0..1) of the samples that are not None, linearly interpolated; None if there are none."""
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q * 100)) if xs else None


def summary(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    return {"n": len(xs), "p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99),
            "mean": statistics.fmean(xs) if xs else None}


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- confidence intervals ------------------------------------------------------------------
# Every interval is a dict {"value", "low", "high", "n", "method"}: n is the number of independent units
# (prompts for bootstrap intervals, outputs for rate intervals); low/high are None when n is too small.
CONFIDENCE = 0.95
RESAMPLES = 2000


def interval(value: float | None, low: float | None, high: float | None, n: int, method: str) -> dict[str, Any]:
    return {"value": value, "low": low, "high": high, "n": n, "method": method}


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic, paired: bool, seed: int, *, method: str = "percentile",
                       n_resamples: int = RESAMPLES, min_n: int = 2,
                       vectorized: bool = True) -> tuple[float | None, float | None]:
    """The one bootstrap of the package (scipy.stats.bootstrap, resampling whole units; ``paired`` keeps the
    units of several arrays together). (None, None) under ``min_n`` units; a point interval when every unit
    is the same; with ``method="BCa"``, the percentile interval where BCa is undefined (degenerate samples)."""
    from scipy.stats import bootstrap

    if len(data[0]) < min_n:
        return None, None
    if len({tuple(x) for x in zip(*data)}) < 2:  # every unit the same: no spread to resample
        v = float(statistic(*data, axis=-1)) if vectorized else float(statistic(*data))
        return v, v
    for m in dict.fromkeys((method, "percentile")):
        with np.errstate(all="ignore"):
            res = bootstrap(data, statistic, paired=paired, vectorized=vectorized, axis=-1, confidence_level=CONFIDENCE,
                            n_resamples=n_resamples, method=m, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            return lo, hi
    return None, None



def _pooled(s, c, axis=-1):
    return np.sum(s, axis=axis) / np.sum(c, axis=axis)


def _diff(b, q, axis=-1):
    return np.mean(q, axis=axis) - np.mean(b, axis=axis)


def _ratio(b, q, axis=-1):
    mb = np.mean(b, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mb != 0, np.mean(q, axis=axis) / np.where(mb != 0, mb, 1), np.nan)


def mean_ci(xs: list[float], seed: int = 0) -> dict[str, Any]:
    """Mean of per-unit values (one per prompt) with a bootstrap interval over the units."""
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    if not len(a):
        return interval(None, None, None, 0, "bootstrap")
    lo, hi = bootstrap_interval((a,), np.mean, False, seed)
    return interval(float(a.mean()), lo, hi, len(a), "bootstrap")


def pooled_mean_ci(sums: list[float], counts: list[float], seed: int = 0) -> dict[str, Any]:
    """sum(sums) / sum(counts) (e.g. a per-position mean pooled over prompts of different lengths), with a
    bootstrap interval that resamples whole units (prompts), so positions of one prompt stay together."""
    pairs = [(s, c) for s, c in zip(sums, counts) if c]
    if not pairs:
        return interval(None, None, None, 0, "bootstrap")
    s, c = (np.asarray(x, dtype=float) for x in zip(*pairs))
    lo, hi = bootstrap_interval((s, c), _pooled, True, seed)
    return interval(float(_pooled(s, c)), lo, hi, len(s), "bootstrap (prompts)")


def rate_ci(k: int, n: int) -> dict[str, Any]:
    """A rate k/n with its Wilson score interval (statsmodels)."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return interval(None, None, None, 0, "wilson")
    lo, hi = proportion_confint(k, n, alpha=1 - CONFIDENCE, method="wilson")
    return interval(k / n, float(lo), float(hi), n, "wilson") | {"k": k}


def paired_ci(base: list[float], quant: list[float], kind: str = "diff", seed: int = 0) -> dict[str, Any]:
    """mean(quant) - mean(base) (``kind='diff'``) or mean(quant) / mean(base) (``'ratio'``) over the same
    units (prompts, same seeds), with a paired bootstrap interval."""
    pairs = [(b, q) for b, q in zip(base, quant) if b is not None and q is not None]
    method = f"paired bootstrap ({kind})"
    if not pairs:
        return interval(None, None, None, 0, method)
    b, q = (np.asarray(x, dtype=float) for x in zip(*pairs))
    stat = _diff if kind == "diff" else _ratio
    value = float(stat(b, q))
    if math.isnan(value):
        return interval(None, None, None, len(b), method)
    lo, hi = bootstrap_interval((b, q), stat, True, seed)
    return interval(value, lo, hi, len(b), method)


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two intervals overlap; None if either lacks bounds."""
    if None in (a.get("low"), a.get("high"), b.get("low"), b.get("high")):
        return None
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def more_units_to_decide(ci: dict[str, Any], threshold: float) -> int | None:
    """How many more units (prompts, outputs) would likely shrink ``ci`` (width ~ 1/sqrt(n)) until it no longer
    holds ``threshold``; None when the estimate sits on the threshold (no n decides it) or bounds are missing."""
    lo, hi, n, v = ci.get("low"), ci.get("high"), ci.get("n") or 0, ci.get("value")
    if None in (lo, hi, v) or n <= 0:
        return None
    gap = abs(v - threshold)
    half = (v - lo) if v > threshold else (hi - v)  # the side of the interval that reaches the threshold
    if gap == 0 or half <= 0:
        return None
    need = math.ceil(n * (half / gap) ** 2)
    return max(need - n, 1)


def _pooled_diff(sa, ca, sb, cb, axis=-1):
    return np.sum(sb, axis=axis) / np.sum(cb, axis=axis) - np.sum(sa, axis=axis) / np.sum(ca, axis=axis)


def paired_pooled_diff(a: dict[str, list[float]], b: dict[str, list[float]], seed: int = 0) -> dict[str, Any]:
    """B's pooled mean minus A's ({"sum": [...], "count": [...]} per prompt, the same prompts in the same
    order), with a paired bootstrap interval over prompts; None bounds when they do not pair."""
    method = "paired bootstrap (prompts)"
    if len(a["sum"]) != len(b["sum"]) or not a["sum"]:
        return interval(None, None, None, 0, method)
    keep = [i for i in range(len(a["sum"])) if a["count"][i] and b["count"][i]]
    arrs = tuple(np.asarray([d[k][i] for i in keep], dtype=float) for d in (a, b) for k in ("sum", "count"))
    if not keep:
        return interval(None, None, None, 0, method)
    lo, hi = bootstrap_interval(arrs, _pooled_diff, True, seed)
    return interval(float(_pooled_diff(*arrs)), lo, hi, len(keep), method)


def significant(diff: dict[str, Any]) -> bool | None:
    """Whether a difference's interval excludes 0; None without an interval."""
    if diff.get("low") is None or diff.get("high") is None:
        return None
    return diff["low"] > 0 or diff["high"] < 0


def bootstrap_ci(xs: list[float], stat: str = "median") -> tuple[float | None, float | None]:
    """95% percentile-bootstrap interval of the median (or mean) of samples (None ignored); (None, None) under 2."""
    x = np.asarray([v for v in xs if v is not None], dtype=float)
    return bootstrap_interval((x,), np.median if stat == "median" else np.mean, False, 0)
