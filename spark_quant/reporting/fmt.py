"""How numbers are written in reports, the comparison table and the model card (one place for each style)."""

from __future__ import annotations

from typing import Any


def num(x: Any, fmt: str = ".2f", none: str = "–") -> str:
    """``x`` in format ``fmt``; ``none`` for a missing value; anything unformattable as text."""
    if x is None:
        return none
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def auto(v: Any) -> str:
    """A table cell of any magnitude: 3 decimals, scientific below 1e-3, no decimals from 100 on."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def ci_text(s: dict[str, Any] | None, fmt: str = ".3f", no_interval: str = "") -> str:
    """A median (or ratio) with its interval, as ``reporting.speed_stats`` returns them: ``m [lo, hi]``;
    ``m`` + ``no_interval`` where there is none (under 3 trials); ``–`` where there is no median."""
    if not s or s.get("median") is None:
        return "–"
    if s.get("lo") is None:
        return f"{format(s['median'], fmt)}{no_interval}"
    return f"{format(s['median'], fmt)} [{format(s['lo'], fmt)}, {format(s['hi'], fmt)}]"
