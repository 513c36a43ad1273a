"""A quantized variant's decode step against BF16's, part by part, and the most any linear-layer quantization can buy
when the GPU is the bottleneck (``spark_quant/reporting/step_budget.py``).

    python eval/step_budget.py REF.result.json QUANT.result.json [--cells 1:sampled,256:greedy,256:sampled]
        [--names BF16,W8A8] [--target 1.3]

The inputs are the step profiles ``eval/gpu_speed.py --stepprof`` keeps (``logs/LABEL-stepprof.result.json``; the
H100's are in docs/results/h100-run4/raw-results.tar.gz under ``sp/``). Reads, prints a markdown table, writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spark_quant.reporting.step_budget import budget, render


def row_of(res: dict, concurrency: int, mode: str, path: Path) -> dict:
    for r in res.get("rows") or []:
        if r["concurrency"] == concurrency and r["mode"] == mode:
            return r
    have = ", ".join(f"{r['concurrency']}:{r['mode']}" for r in res.get("rows") or []) or "none"
    raise SystemExit(f"step_budget: {path}: no row {concurrency}:{mode} (rows: {have})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("quant", type=Path)
    ap.add_argument("--cells", default="1:sampled,256:greedy,256:sampled", help="CONCURRENCY:MODE,...")
    ap.add_argument("--names", default="BF16,W8A8")
    ap.add_argument("--target", type=float, default=1.3, help="the throughput ratio to reach (issue 14: 1.3)")
    a = ap.parse_args(argv)
    docs = []
    for p in (a.ref, a.quant):
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"step_budget: {p}: not a step profile's JSON ({e})") from None
    try:
        cells = [(int(c), m) for c, _, m in (x.partition(":") for x in a.cells.split(","))]
    except ValueError:
        raise SystemExit(f"step_budget: --cells {a.cells!r}: expected CONCURRENCY:MODE,...") from None
    rows = [budget(row_of(docs[0], c, m, a.ref), row_of(docs[1], c, m, a.quant), a.target) for c, m in cells]
    ref_name, _, quant_name = a.names.partition(",")
    print("\n".join(render(rows, ref_name, quant_name or "quantized")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
