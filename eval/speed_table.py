"""Speed table from saved serve_worker results (a run cut short, or results copied back from a GPU host).

    python eval/speed_table.py --title "NVIDIA H100 80GB HBM3, vLLM 0.26.0" RESULT.json [RESULT.json ...]

Each file is one worker's ``<label>-<repeat>.result.json`` (eval/gpu_speed.py's ``logs/``); files with
the same label are repeats and are summarised together (medians), as gpu_speed.py does. The first
label is the reference for ratios. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from spark_quant.reporting.metrics import speed_summary
from spark_quant.reporting.report import render_speed_matrix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {}
    for f in a.results:
        label = re.sub(r"-\d+\.result\.json$", "", f.name)
        runs.setdefault(label, []).append(json.loads(f.read_text()))
    summ = {lb: speed_summary([r for r in rs if r.get("ok")], 1.0) for lb, rs in runs.items()}
    conc = sorted({t["concurrency"] for s in summ.values() for t in s["throughput"]})
    lines = [f"Speed ({a.title}); medians over each label's runs; ratios against `{next(iter(summ))}`.", ""]
    lines += render_speed_matrix(summ, conc)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
