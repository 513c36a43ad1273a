"""``spark-quant sweep`` and ``spark-quant compare``: run several experiments through every stage, then one
comparison folder (``comparison.md``, ``comparison.json``, ``fidelity_vs_speed.png``, manifest) from their
finished eval folders. The table and plot themselves are ``reporting.compare``.

``sweep --paired-speed CELLS`` adds issue 14's paired speed method to the same run: after the evals, the BF16
baseline and every finished checkpoint are resident together (one engine each) and each cell's trials are
alternated between them (``stages/paired.py``); the comparison then carries each recipe's speed ratio to BF16 as
a median with its paired 95% CI and n, and keeps ``paired.json`` / ``paired.md``. ``compare --paired
paired.json`` folds such a run into a comparison made from eval folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import read_manifest, require_manifest, verify_files, write_manifest
from spark_quant.errors import UserError
from spark_quant.outputs import TMP_TAG, check_not_a_source, check_writable, remove_dead_temporaries, stage_folder
from spark_quant.reporting.compare import add_paired, paired_cells_text, render_plot, render_table, row_from_results

BASELINE_LABEL = "bf16"


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


def read_paired(path: Path) -> dict[str, Any]:
    """A paired run's ``paired.json``, or its gzipped copy (one line on what is wrong with it otherwise)."""
    import gzip

    try:
        raw = Path(path).read_bytes()
        res = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; name the paired.json of a paired speed run") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a paired run's JSON ({e}); name the paired.json it wrote") from None
    if not isinstance(res, dict) or not isinstance(res.get("cells"), dict):
        raise UserError(f"{path}: has no 'cells'; it is not a paired run's paired.json")
    return res


def compare(result_dirs: list[Path], out: Path, overwrite: bool = True, paired: Path | None = None) -> Path:
    if not result_dirs:
        raise UserError("compare: name at least one eval folder (eval/results/<experiment>)")
    check_not_a_source(Path(out), [Path(d) for d in result_dirs] + ([Path(paired)] if paired else []), "compare")
    check_writable(Path(out), overwrite, "compare")
    pres = read_paired(paired) if paired is not None else None
    rows = [_row_or_missing(Path(d)) for d in result_dirs]
    if pres is not None:
        add_paired(rows, pres, BASELINE_LABEL)
    if all(r["verdict"].startswith("missing") for r in rows) and not any(r.get("paired") for r in rows):
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
        if pres is not None:
            md += [paired_cells_text(pres, BASELINE_LABEL), ""]
            (tmp / "paired.json").write_text(json.dumps(pres, separators=(",", ":"), default=str))
            from spark_quant.reporting.paired import render_markdown

            (tmp / "paired.md").write_text(render_markdown(pres))
        if has_plot:
            md += ["![fidelity vs speed](fidelity_vs_speed.png)", ""]
        (tmp / "comparison.md").write_text("\n".join(md))
        write_manifest(tmp, "compare", {"result_dirs": [str(d) for d in result_dirs],
                                        "paired": str(paired) if paired is not None else None},
                       {"results": {str(d): (read_manifest(Path(d)) or {}).get("files", {}).get("results.json")
                                    for d in result_dirs}}, started)
    print(render_table(rows))
    print(f"comparison: {Path(out) / 'comparison.md'}")
    return Path(out)


def parse_paired_cells(text: str) -> list[tuple[str, int, int]]:
    """``b1=1:200,c256=256:128`` -> [(name, concurrency, tokens), ...] (one line naming the bad cell)."""
    cells = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        name, sep, rest = item.partition("=")
        conc, sep2, tokens = rest.partition(":")
        try:
            c, t = int(conc), int(tokens)
        except ValueError:
            c = t = 0
        if not (sep and sep2 and name) or c < 1 or t < 2:
            raise UserError(f"--paired-speed {item!r}: expected NAME=CONCURRENCY:TOKENS (concurrency >= 1, "
                            "tokens >= 2), e.g. b1=1:200,c256=256:128")
        cells.append((name, c, t))
    if not cells:
        raise UserError("--paired-speed: name at least one cell, e.g. b1=1:200,c256=256:128")
    if len({n for n, _, _ in cells}) != len(cells):
        raise UserError(f"--paired-speed {text!r}: cell names must be unique")
    return cells


def paired_args(exps: list[Any], paths: list[Path], overrides: list[str], cells: list[tuple[str, int, int]],
                trials: int, out: Path, parallel_start: float | None = None) -> list[str]:
    """The paired run of a sweep: the first experiment's BF16 model and every experiment's checkpoint, one
    engine each, all resident together; each cell's rounds alternate between all of them."""
    base, _ = exps[0].resolved_model()
    labels = [BASELINE_LABEL] + [x.name for x in exps]
    one = '::{"replicas": 1}'
    args = ["--out", str(out), "--experiment", str(paths[0]), "--trials", str(trials),
            *[a for o in overrides for a in ("--set", o)],
            "--variant", f"{BASELINE_LABEL}={Path(base) / 'LLM'}{one}"]
    for x in exps:
        args += ["--variant", f"{x.name}={Path(x.checkpoint_dir) / 'LLM'}{one}"]
    for name, conc, tokens in cells:
        args += ["--cell", f"{name}={conc}:{tokens}:{','.join(labels)}"]
    if parallel_start:
        args += ["--parallel-start", str(parallel_start)]
    return args


def _paired_run(exps: list[Any], paths: list[Path], overrides: list[str], cells: list[tuple[str, int, int]],
                trials: int, out: Path, parallel_start: float | None = None) -> Path | None:
    """Run the paired speed step into a temporary folder the sweep owns (``.<out>-paired.tmp-PID`` beside
    ``out``); its paired.json (None if the run wrote none), for compare to copy into the comparison."""
    import os
    import shutil
    import subprocess

    from spark_quant.serving.client import stage_python

    done = [(p, x) for p, x in zip(paths, exps) if (Path(x.checkpoint_dir) / "LLM" / "config.json").is_file()]
    if not done:
        print("sweep: paired speed not run: no experiment has a checkpoint", flush=True)
        return None
    pseudo = Path(out).parent / f"{Path(out).name}-paired"
    remove_dead_temporaries(pseudo)
    tmp = pseudo.parent / f".{pseudo.name}{TMP_TAG}{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=False)
    args = paired_args([x for _, x in done], [p for p, _ in done], overrides, cells, trials, tmp, parallel_start)
    print(f"sweep: paired speed of {BASELINE_LABEL} and {len(done)} checkpoint(s), {trials} alternated rounds "
          f"per cell", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run([stage_python("serve"), "-m", "spark_quant.stages.paired", *args]).returncode
    print(f"sweep: paired speed took {time.perf_counter() - t0:.0f} s (exit {rc})", flush=True)
    if rc != 0:
        print(f"sweep: paired speed exited {rc}; what it measured is kept in the comparison", flush=True)
    if (tmp / "paired.json").is_file():
        return tmp / "paired.json"
    shutil.rmtree(tmp, ignore_errors=True)  # nothing to keep: the comparison written before stands
    return None


def sweep(experiments: list[Path], overrides: list[str], out: Path, paired_speed: str | None = None,
          paired_trials: int = 20, paired_first: bool = False, paired_parallel_start: float | None = None) -> Path:
    """calibrate, quantize and eval each experiment (each in its environment), then compare them all.

    Every stage skips itself when its inputs did not change, reuses a sibling folder made from the
    same inputs (experiments that share calibration settings share one calibration, and so on), and
    the BF16 baseline's runs are cached by model, settings, versions and device, so it is measured
    once. A failing experiment (crash, gate) is reported in the table; the sweep goes on.

    ``paired_speed`` (cells ``NAME=CONCURRENCY:TOKENS,...``): then the paired speed step (module docstring);
    the comparison is written once before it, so a paired run that dies costs nothing already measured.
    ``paired_first``: the paired step right after every checkpoint is quantized, before the evals, and the
    comparison written after it (speed columns, rows "not evaluated") and again after the evals: where device
    time is short, the speed ranking comes first and each eval adds its fidelity row to it.
    ``paired_parallel_start`` (GiB): the paired step's engines start all at once, each with that KV cache.
    """
    import shutil
    import subprocess

    from spark_quant.config import load_experiment
    from spark_quant.serving.client import stage_python

    if not experiments:
        raise UserError("sweep: name at least one experiment YAML (EXPERIMENTS=\"a.yaml b.yaml\")")
    exps = [load_experiment(Path(e), overrides) for e in experiments]  # validate them all before any work
    cells = parse_paired_cells(paired_speed) if paired_speed is not None else None
    if paired_first and cells is None:
        raise UserError("sweep --paired-first: name the cells to time with --paired-speed (e.g. b1=1:200)")
    if paired_parallel_start is not None and (cells is None or paired_parallel_start <= 0):
        raise UserError(f"sweep --paired-parallel-start {paired_parallel_start}: a KV cache in GiB (> 0) for the "
                        "engines of --paired-speed")
    if cells is not None and paired_trials < 3:
        raise UserError(f"--paired-trials {paired_trials}: a paired interval needs at least 3 rounds (20 is the method's)")
    if cells is not None and BASELINE_LABEL in [x.name for x in exps]:  # refused before any work, not after the evals
        raise UserError(f"sweep --paired-speed: an experiment is named {BASELINE_LABEL!r}, the baseline's label; "
                        "rename it")
    # the comparison folder is checked now, not after hours of runs: new, empty or a comparison it made
    check_not_a_source(Path(out), [Path(e) for e in experiments], "sweep")
    check_writable(Path(out), overwrite=True, stage="compare")
    names = [x.name for x in exps]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"sweep: experiments share the name(s) {dup}; their outputs would collide (rename one)")
    sets = [a for o in overrides for a in ("--set", o)]
    failed: dict[str, tuple[str, int]] = {}  # experiment -> the stage that failed and its exit status

    def run(stages: tuple[str, ...]) -> None:
        for path, exp in zip(experiments, exps):
            for stage in stages:
                if exp.name in failed:
                    break
                print(f"sweep: {exp.name}: {stage}", flush=True)
                py = "serve" if stage == "eval" else "quant"
                t0 = time.perf_counter()
                rc = subprocess.run([stage_python(py), "-m", "spark_quant", stage, "-e", str(path), *sets]).returncode
                print(f"sweep: {exp.name}: {stage} took {time.perf_counter() - t0:.0f} s (exit {rc})", flush=True)
                if rc != 0:
                    failed[exp.name] = (stage, rc)

    def timed() -> tuple[list[Any], list[Path]]:  # a checkpoint whose calibrate or quantize failed now is not timed
        keep = [(x, p) for x, p in zip(exps, experiments) if failed.get(x.name, ("eval",))[0] == "eval"]
        return [x for x, _ in keep], [Path(p) for _, p in keep]

    dirs = [x.results_dir for x in exps]
    pj = None
    try:
        if paired_first:
            run(("calibrate", "quantize"))
            pj = _paired_run(*timed(), overrides, cells, paired_trials, Path(out), paired_parallel_start)
            if pj is not None:  # the speed columns now; the evals fill in the rows
                result = compare(dirs, out, paired=pj)
            run(("eval",))
            result = compare(dirs, out, paired=pj)
        else:
            run(("calibrate", "quantize", "eval"))
            result = compare(dirs, out)
            if cells is not None:
                pj = _paired_run(*timed(), overrides, cells, paired_trials, Path(out), paired_parallel_start)
                if pj is not None:
                    result = compare(dirs, out, paired=pj)
    finally:
        if pj is not None:
            shutil.rmtree(pj.parent, ignore_errors=True)
    if failed:
        print(f"sweep: not passed: {', '.join(f'{n} ({st}, exit {rc})' for n, (st, rc) in failed.items())}")
    return result
