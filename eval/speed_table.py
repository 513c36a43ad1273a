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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spark_quant.evaluate import speed_summary  # noqa: E402
from spark_quant.report import _f  # noqa: E402


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
    ref = {t["concurrency"]: t["tokens_per_s"] for t in next(iter(summ.values()))["throughput"]}
    lines = [f"Speed ({a.title}); medians over each label's runs; ratios against `{next(iter(summ))}`.", "",
             "| variant | runs | b1 ms/token sampled | b1 ms/token greedy | "
             + " | ".join(f"tok/s c={c}" for c in conc) + f" | c={conc[-1]} ratio |", "|" + "---|" * (5 + len(conc))]
    for lb, s in summ.items():
        tps = {t["concurrency"]: t["tokens_per_s"] for t in s["throughput"]}
        ratio = tps[conc[-1]] / ref[conc[-1]] if tps.get(conc[-1]) and ref.get(conc[-1]) else None
        lines.append(f"| {lb} | {len(runs[lb])} | {_f(s['ms_per_token_sampled'], '.3f')} | "
                     f"{_f(s['ms_per_token_greedy'], '.3f')} | " + " | ".join(_f(tps.get(c), ".0f") for c in conc)
                     + f" | {_f(ratio)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
