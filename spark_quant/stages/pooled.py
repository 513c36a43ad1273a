"""Pool one paired comparison over several runs (machines): is a ratio the same on another machine?

    python -m spark_quant.stages.pooled --run NAME=PATH --run NAME=PATH [--run ...] --ratio OF/TO
        --cell CELL [--cell ...] --out DIR [--overwrite]

``PATH`` is a paired run's ``paired.json`` (or ``.json.gz``); every run must hold the cells with both variants
(the same labels). For each cell: each run's ratio recomputed from its raw rounds, the pooled ratio with an
interval that covers the spread between machines, tau (that spread), the prediction interval for the next
machine, and the pairwise check "each median inside the other's CI and within 5%"
(``spark_quant/reporting/pooled.py`` says how). Writes ``pooled.json``, ``pooled.md`` and ``forest.png`` into
a new folder (only a finished ``pooled`` folder is replaced, and only with ``--overwrite``). Either environment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from spark_quant.errors import UserError, run_main
from spark_quant.outputs import check_not_a_source, stage_folder


def parse_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--run {text!r}: expected NAME=PATH (PATH: a paired run's paired.json or .json.gz)")
    return name, Path(path)


def pooled(runs: list[tuple[str, Path]], of: str, to: str, cells: list[str]) -> dict[str, dict[str, Any]]:
    """Every cell's runs and their pooled ratio (``reporting.pooled``); UserError names the file at fault."""
    from spark_quant.reporting.pooled import pool, run_ratio
    from spark_quant.stages.sweep import read_paired

    data = {name: (path, read_paired(path)) for name, path in runs}
    out = {}
    for cell in cells:
        ratios = []
        for name, (path, res) in data.items():
            try:
                ratios.append(run_ratio(res, cell, of, to, name))
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
        out[cell] = {"of": of, "to": to, "runs": ratios, "pooled": pool(ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    from spark_quant.artifacts import sha256_file, write_manifest
    from spark_quant.reporting.pooled import plot_forest, render_markdown

    started = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, type=parse_run, metavar="NAME=PATH")
    ap.add_argument("--ratio", required=True, metavar="OF/TO", help="the variants' labels, e.g. w8a8-x3mp/bf16-x3mp")
    ap.add_argument("--cell", action="append", required=True, help="a cell every run has, e.g. c1024 (repeatable)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace a finished pooled folder at --out")
    a = ap.parse_args(argv)
    of, sep, to = a.ratio.partition("/")
    if not sep or not of or not to or of == to:
        raise UserError(f"--ratio {a.ratio!r}: expected OF/TO, two different variant labels")
    names = [n for n, _ in a.run]
    if len(set(names)) != len(names):
        raise UserError("--run: run names must be unique")
    if len(a.run) < 2:
        raise UserError("--run: name at least two runs of the same comparison (one per machine)")
    check_not_a_source(a.out, [p for _, p in a.run], "pooled")
    cells = pooled(a.run, of, to, list(dict.fromkeys(a.cell)))
    title = a.title or f"{of} / {to} over {len(a.run)} runs"
    md = render_markdown(title, cells)
    with stage_folder(a.out, a.overwrite, "pooled") as tmp:
        (tmp / "pooled.json").write_text(json.dumps({"title": title, "runs": {n: str(p) for n, p in a.run},
                                                     "cells": cells}, indent=1) + "\n")
        (tmp / "pooled.md").write_text(md)
        plot_forest(cells, tmp / "forest.png")
        inputs = {n: {"path": str(p), "sha256": sha256_file(p)} for n, p in a.run}
        write_manifest(tmp, "pooled", {"ratio": a.ratio, "cells": a.cell}, inputs, started)
    print(md)
    return 0


if __name__ == "__main__":
    run_main(main)
