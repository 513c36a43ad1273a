"""Quality gates decided on confidence intervals (pure; ``stages/evaluate.py`` calls it).

A gate compares a fidelity number's 95% interval (``metrics.fidelity``) with the threshold in its
``eval.*`` field (``metrics.METRICS``: a minimum when higher is better, a maximum when lower is better, and for
a number that should be close to its target, e.g. the duration ratio 1, a tolerance: the band target ± it):

- PASS when the whole interval clears the threshold,
- FAIL when the whole interval misses it,
- INCONCLUSIVE when the interval holds it; the line says about how many more units (prompts, or
  outputs for a rate) would decide it if the estimate stayed where it is (the width goes as 1/sqrt(n)).
"""

from __future__ import annotations

import math
from typing import Any

from spark_quant.reporting.metrics import METRICS
from spark_quant.reporting.stats import more_units_to_decide

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


def decide(ci: dict[str, Any], threshold: float, higher_is_better: bool,
           bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """PASS / FAIL / INCONCLUSIVE of one interval against a minimum (higher is better) or a maximum; without
    an interval (fewer than 2 units) it is the metric's whole range ``bounds``."""
    lo, hi = ci.get("low"), ci.get("high")
    if lo is None or hi is None:
        lo, hi = bounds
    if higher_is_better:
        return PASS if lo >= threshold else FAIL if hi < threshold else INCONCLUSIVE
    return PASS if hi <= threshold else FAIL if lo > threshold else INCONCLUSIVE


def decide_band(ci: dict[str, Any], low: float, high: float,
                bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """PASS when the whole interval lies in [low, high], FAIL when it lies wholly outside (above or below),
    else INCONCLUSIVE; without an interval it is the metric's whole range ``bounds``."""
    lo, hi = ci.get("low"), ci.get("high")
    if lo is None or hi is None:
        lo, hi = bounds
    if low <= lo and hi <= high:
        return PASS
    return FAIL if hi < low or lo > high else INCONCLUSIVE


def _units(ci: dict[str, Any]) -> str:
    return "outputs" if ci.get("method") == "wilson" else "prompts"


def check_gates(fid: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One decision per gated metric whose threshold is set and whose number was measured."""
    out = []
    for m in METRICS.values():
        threshold = settings.get(m.gate) if m.gate else None
        ci = fid.get(m.key)
        if threshold is None or not ci or ci.get("value") is None:
            continue
        # a threshold at the end of the metric's range cannot be missed (the default greedy prefix >= 0.0): no gate
        if (m.higher_is_better is True and threshold <= m.bounds[0]) or \
                (m.higher_is_better is False and threshold >= m.bounds[1]):
            continue
        lo, hi, v = ci.get("low"), ci.get("high"), ci["value"]
        if m.higher_is_better is None:  # a tolerance around the target: the band's edge nearest the value decides
            band = (m.target - threshold, m.target + threshold)
            status = decide_band(ci, *band, m.bounds)
            edge = band[0] if v < m.target else band[1]
            cond = f"within {m.target:g} ± {threshold}"
        else:
            status = decide(ci, threshold, m.higher_is_better, m.bounds)
            edge = threshold
            cond = f"{'>=' if m.higher_is_better else '<='} {threshold}"
        bounds = f"[{lo:{m.fmt}}, {hi:{m.fmt}}]" if lo is not None and hi is not None else "[no interval]"
        text = f"{m.label} {v:{m.fmt}} {bounds} (n={ci['n']} {_units(ci)}) vs eval.{m.gate} {cond}"
        more = more_units_to_decide(ci, edge) if status == INCONCLUSIVE else None
        if status == INCONCLUSIVE:
            text += (f": interval holds the threshold; about {more} more {_units(ci)} would decide it"
                     if more else ": interval holds the threshold; the estimate sits on it")
        out.append({"metric": m.key, "gate": m.gate, "threshold": threshold, "status": status,
                    "interval": {k: ci.get(k) for k in ("value", "low", "high", "n", "method")},
                    "more_units": more, "text": text})
    return out


def verdict(gates: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    """The eval's verdict: FAIL if a check failed (a vLLM run, the kernel) or a gate's interval misses its
    threshold, else INCONCLUSIVE if a gate's interval holds it, else PASS."""
    failed = list(failures) + [g["text"] for g in gates if g["status"] == FAIL]
    inconclusive = [g["text"] for g in gates if g["status"] == INCONCLUSIVE]
    status = FAIL if failed else INCONCLUSIVE if inconclusive else PASS
    return {"status": status, "passed": status == PASS, "failures": failed, "inconclusive": inconclusive,
            "gates": gates}


def verdict_line(v: dict[str, Any]) -> str:
    """One line for a table or the console: PASS, FAIL: reasons, INCONCLUSIVE: reasons."""
    status = v.get("status") or ("PASS" if v.get("passed") else FAIL)
    if status == PASS:
        return PASS
    reasons = v.get("failures") if status == FAIL else v.get("inconclusive")
    return f"{status}: " + "; ".join(reasons or [])
