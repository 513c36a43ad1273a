"""Summary statistics of raw samples."""

from __future__ import annotations

import statistics

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
