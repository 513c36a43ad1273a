"""Statistics of the paired speed method: medians with bootstrap intervals, paired ratios, verdicts.

Pure functions over lists of numbers (scipy only). A *paired* ratio compares two variants measured in
the same rounds (A and B alternated within seconds): the statistic is the median of the per-round
ratios B/A, and the bootstrap resamples whole rounds (``scipy.stats.bootstrap(..., paired=True)``), so
drift that moves both variants of a round together cancels out. A ratio whose interval contains 1.0 is
"no difference".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spark_quant.reporting.stats import CONFIDENCE, bootstrap_interval  # noqa: F401 (CONFIDENCE: the level used)

N_RESAMPLES = 9999


def _bootstrap(data: tuple, statistic, paired: bool, seed: int) -> tuple[float | None, float | None]:
    """BCa (percentile where BCa is undefined), 9,999 resamples of whole rounds, no interval under 3 trials."""
    return bootstrap_interval(data, statistic, paired, seed, method="BCa", n_resamples=N_RESAMPLES, min_n=3,
                              vectorized=False)


def median_ci(xs: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Median of one variant's trials with its 95% bootstrap interval and n (interval None under 3 trials)."""
    x = np.asarray([v for v in xs if v is not None], dtype=float)
    if x.size == 0:
        return {"median": None, "lo": None, "hi": None, "n": 0}
    lo, hi = _bootstrap((x,), np.median, paired=False, seed=seed)
    return {"median": float(np.median(x)), "lo": lo, "hi": hi, "n": int(x.size)}


def verdict(lo: float | None, hi: float | None, median: float, higher_is_better: bool) -> str:
    """'faster' / 'slower' when the interval excludes 1.0, else 'no difference' (or 'too few trials')."""
    if lo is None or hi is None:
        return "too few trials"
    if lo <= 1.0 <= hi:
        return "no difference"
    return "faster" if (median > 1.0) == higher_is_better else "slower"


def paired_ratio(ref: Sequence[float], other: Sequence[float], higher_is_better: bool, seed: int = 0) -> dict[str, Any]:
    """other / ref over paired trials: median of the per-trial ratios, 95% paired bootstrap CI, n, verdict.

    Trials where either value is missing are dropped in pairs. ``higher_is_better`` says which way is
    faster (tokens/s: True; ms/token: False).
    """
    if len(ref) != len(other):
        raise ValueError(f"paired trials need equal lengths, got {len(ref)} and {len(other)}")
    pairs = [(a, b) for a, b in zip(ref, other) if a is not None and b is not None and a > 0]
    if not pairs:
        return {"median": None, "lo": None, "hi": None, "n": 0, "verdict": "too few trials"}
    a = np.asarray([p[0] for p in pairs], dtype=float)
    b = np.asarray([p[1] for p in pairs], dtype=float)

    def stat(x, y):
        return np.median(y / x)

    lo, hi = _bootstrap((a, b), stat, paired=True, seed=seed)
    med = float(stat(a, b))
    return {"median": med, "lo": lo, "hi": hi, "n": len(pairs), "verdict": verdict(lo, hi, med, higher_is_better)}


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of the values that are not None, linear interpolation (None if none)."""
    x = [v for v in xs if v is not None]
    return float(np.quantile(np.asarray(x, dtype=float), q)) if x else None


def intervals_agree(a: dict[str, Any], b: dict[str, Any], within: float = 0.05) -> dict[str, Any]:
    """The two-machine check: each median inside the other's interval, and the medians within ``within``."""
    if a.get("median") is None or b.get("median") is None or a.get("lo") is None or b.get("lo") is None:
        return {"inside_each_other": None, "relative_difference": None, "within": None}
    inside = a["lo"] <= b["median"] <= a["hi"] and b["lo"] <= a["median"] <= b["hi"]
    rel = abs(a["median"] - b["median"]) / a["median"]
    return {"inside_each_other": bool(inside), "relative_difference": rel, "within": bool(rel <= within)}


def by_concurrency(d: dict[Any, Any] | None) -> dict[int, Any]:
    """A per-concurrency dict of results.json (JSON keys are strings) keyed by int concurrency again."""
    return {int(k): v for k, v in (d or {}).items()}
