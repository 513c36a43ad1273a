"""``spark-quant sweep`` and ``spark-quant compare``: run several experiments through every stage, then one
comparison folder (``comparison.md``, ``comparison.json``, ``fidelity_vs_speed.png``, manifest) from their
finished eval folders. The table and plot themselves are ``reporting.compare``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import read_manifest, require_manifest, verify_files, write_manifest
from spark_quant.errors import UserError
from spark_quant.outputs import check_not_a_source, check_writable, stage_folder
from spark_quant.reporting.compare import render_plot, render_table, row_from_results


def row_for(folder: Path) -> dict[str, Any]:
    """One comparison row from a finished eval folder (manifest verified) and its checkpoint's manifest."""
    folder = Path(folder)
    man = require_manifest(folder, "eval", "run `make eval EXPERIMENT=...` for it first")
    verify_files(folder, man)
    res = json.loads((folder / "results.json").read_text())
    qdir = man.get("checkpoint_dir")
    qman = read_manifest(Path(qdir)) if qdir and Path(qdir).is_dir() else None
    return row_from_results(res, qman, folder)


def _row_or_missing(folder: Path) -> dict[str, Any]:
    """A finished folder gives its row; a missing or unfinished one a row that says so (a sweep goes on)."""
    if not (Path(folder) / "manifest.json").is_file():
        why = "eval did not finish" if Path(folder).exists() else "not evaluated"
        return {"experiment": Path(folder).name, "folder": str(folder), "verdict": f"missing: {why} (see its log)"}
    return row_for(Path(folder))


def compare(result_dirs: list[Path], out: Path, overwrite: bool = True) -> Path:
    if not result_dirs:
        raise UserError("compare: name at least one eval folder (eval/results/<experiment>)")
    check_not_a_source(Path(out), [Path(d) for d in result_dirs], "compare")
    check_writable(Path(out), overwrite, "compare")
    rows = [_row_or_missing(Path(d)) for d in result_dirs]
    if all(r["verdict"].startswith("missing") for r in rows):
        raise UserError(f"compare: none of {', '.join(map(str, result_dirs))} is a finished eval folder; "
                        "run `make eval EXPERIMENT=...` first")
    started = time.time()
    devices = sorted({str(r.get("gpu") or r.get("device")) for r in rows})
    with stage_folder(Path(out), overwrite=overwrite, stage="compare", replace_stale=True) as tmp:
        (tmp / "comparison.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        has_plot = render_plot(rows, tmp / "fidelity_vs_speed.png")
        md = [f"# Recipe comparison ({', '.join(devices)})", "",
              "Ratios are quantized / BF16 baseline (< 1 for ms/token and > 1 for tok/s is better). "
              "TF = teacher-forced on the baseline's greedy outputs. Every row's raw numbers are in its "
              "eval folder (`folder` in comparison.json).", "", render_table(rows), ""]
        if has_plot:
            md += ["![fidelity vs speed](fidelity_vs_speed.png)", ""]
        (tmp / "comparison.md").write_text("\n".join(md))
        write_manifest(tmp, "compare", {"result_dirs": [str(d) for d in result_dirs]},
                       {"results": {str(d): (read_manifest(Path(d)) or {}).get("files", {}).get("results.json")
                                    for d in result_dirs}}, started)
    print(render_table(rows))
    print(f"comparison: {Path(out) / 'comparison.md'}")
    return Path(out)


def sweep(experiments: list[Path], overrides: list[str], out: Path) -> Path:
    """calibrate, quantize and eval each experiment (each in its environment), then compare them all.

    Every stage skips itself when its inputs did not change, reuses a sibling folder made from the
    same inputs (experiments that share calibration settings share one calibration, and so on), and
    the BF16 baseline's runs are cached by model, settings, versions and device, so it is measured
    once. A failing experiment (crash, gate) is reported in the table; the sweep goes on.
    """
    import subprocess

    from spark_quant.config import load_experiment
    from spark_quant.serving.client import stage_python

    if not experiments:
        raise UserError("sweep: name at least one experiment YAML (EXPERIMENTS=\"a.yaml b.yaml\")")
    exps = [load_experiment(Path(e), overrides) for e in experiments]  # validate them all before any work
    # the comparison folder is checked now, not after hours of runs: new, empty or a comparison it made
    check_not_a_source(Path(out), [Path(e) for e in experiments], "sweep")
    check_writable(Path(out), overwrite=True, stage="compare")
    names = [x.name for x in exps]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"sweep: experiments share the name(s) {dup}; their outputs would collide (rename one)")
    sets = [a for o in overrides for a in ("--set", o)]
    failed: list[str] = []
    for path, exp in zip(experiments, exps):
        for stage, py in (("calibrate", "quant"), ("quantize", "quant"), ("eval", "serve")):
            print(f"sweep: {exp.name}: {stage}", flush=True)
            rc = subprocess.run([stage_python(py), "-m", "spark_quant", stage, "-e", str(path), *sets]).returncode
            if rc != 0:
                failed.append(f"{exp.name} ({stage}, exit {rc})")
                break
    result = compare([x.results_dir for x in exps], out)
    if failed:
        print(f"sweep: not passed: {', '.join(failed)}")
    return result
