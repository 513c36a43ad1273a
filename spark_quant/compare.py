"""One table and one plot for several evaluated experiments (``spark-quant compare``, ``make sweep``).

Reads only finished eval folders (``eval/results/<experiment>/``, manifest verified) and the
quantize manifests they point to. Writes ``comparison.md``, ``comparison.json`` and
``fidelity_vs_speed.png`` into one folder, atomically, with its own manifest.

Columns: fidelity against the BF16 baseline (teacher-forced top-1 agreement and KL, NLL
difference, greedy prefix agreement and exact match, sampled valid-rate recovery, semantic
histogram distance), speed ratios (quantized / baseline: ms per token at batch 1, sampled and
greedy; output tokens/s at the highest concurrency measured), weight bytes as served and
quantization time. A skipped eval (e.g. FP8 without an FP8 GPU) is a row that says why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import read_manifest, require_manifest, stage_folder, verify_files, write_manifest
from spark_quant.errors import UserError

COLUMNS = [
    ("experiment", "experiment"),
    ("recipe", "recipe"),
    ("weights_gb", "weights GB"),
    ("quantize_s", "quantize s"),
    ("top1", "TF top-1"),
    ("kl", "TF KL"),
    ("nll_delta", "ΔNLL"),
    ("greedy_prefix", "greedy prefix"),
    ("greedy_exact", "greedy exact"),
    ("valid_recovery", "valid rate q/b"),
    ("semantic_tv", "semantic TV"),
    ("ms_sampled_ratio", "b1 ms/tok sampled q/b"),
    ("ms_greedy_ratio", "b1 ms/tok greedy q/b"),
    ("tps_ratio_max_c", "tok/s q/b @max c"),
    ("verdict", "verdict"),
]


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def row_for(folder: Path) -> dict[str, Any]:
    """One comparison row from a finished eval folder."""
    folder = Path(folder)
    man = require_manifest(folder, "eval", "run `make eval EXPERIMENT=...` for it first")
    verify_files(folder, man)
    res = json.loads((folder / "results.json").read_text())
    ckpt = res.get("checkpoint", {})
    row: dict[str, Any] = {"experiment": res.get("experiment", folder.name), "folder": str(folder),
                           "recipe": Path(ckpt.get("recipe") or "?").stem, "device": res.get("device"),
                           "gpu": _get(res, "host", "gpu")}
    total = _get(ckpt, "weights", "total_bytes")
    row["weights_gb"] = total / 1e9 if total else None
    qdir = man.get("checkpoint_dir")
    qman = read_manifest(Path(qdir)) if qdir and Path(qdir).is_dir() else None
    row["quantize_s"] = _get(qman, "timings", "oneshot_s") if qman else None
    if res.get("skipped"):
        row["verdict"] = f"skipped: {res['skipped']}"
        return row
    sim = res.get("similarity", {})
    row["top1"] = _get(sim, "teacher_forced", "top1_agreement")
    row["kl"] = _get(sim, "teacher_forced", "kl_base_quant_mean")
    row["nll_delta"] = _get(sim, "teacher_forced", "nll_delta_mean")
    row["greedy_prefix"] = _get(sim, "greedy", "prefix_agreement_mean")
    row["greedy_exact"] = _get(sim, "greedy", "exact_match_rate")
    row["valid_recovery"] = _get(sim, "sampled", "valid_rate_recovery")
    row["valid_rate"] = _get(sim, "sampled", "quantized", "valid_rate")
    row["valid_rate_baseline"] = _get(sim, "sampled", "baseline", "valid_rate")
    row["semantic_tv"] = _get(sim, "sampled", "semantic_distribution_tv")
    ratios = res.get("ratios") or {}
    row["ms_sampled_ratio"] = ratios.get("ms_per_token_sampled")
    row["ms_greedy_ratio"] = ratios.get("ms_per_token_greedy")
    tps = {int(k): v for k, v in (ratios.get("tokens_per_s") or {}).items() if v is not None}
    row["max_concurrency"] = max(tps) if tps else None
    row["tps_ratio_max_c"] = tps[max(tps)] if tps else None
    row["ms_per_token_sampled"] = _get(res, "speed", "quantized", "ms_per_token_sampled")
    row["ms_per_token_sampled_baseline"] = _get(res, "speed", "baseline", "ms_per_token_sampled")
    verdict = res.get("verdict", {})
    row["verdict"] = "PASS" if verdict.get("passed") else "FAIL: " + "; ".join(verdict.get("failures", []))[:120]
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_fmt(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def render_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Teacher-forced KL (lower is better) against batch-1 sampled speed ratio, one point per experiment."""
    pts = [r for r in rows if r.get("kl") is not None and r.get("ms_sampled_ratio") is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(1.0 / r["ms_sampled_ratio"], max(r["kl"], 1e-7), s=40)
        ax.annotate(r["experiment"], (1.0 / r["ms_sampled_ratio"], max(r["kl"], 1e-7)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("batch-1 speed-up over BF16 (sampled ms/token, baseline / quantized)")
    ax.set_ylabel("teacher-forced KL(BF16 || quantized), log")
    devices = sorted({str(r.get("gpu") or r.get("device")) for r in pts})
    ax.set_title(f"fidelity vs speed ({', '.join(devices)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _row_or_missing(folder: Path) -> dict[str, Any]:
    """A finished folder gives its row; a missing or unfinished one a row that says so (a sweep goes on)."""
    if not (Path(folder) / "manifest.json").is_file():
        why = "eval did not finish" if Path(folder).exists() else "not evaluated"
        return {"experiment": Path(folder).name, "folder": str(folder), "verdict": f"missing: {why} (see its log)"}
    return row_for(Path(folder))


def compare(result_dirs: list[Path], out: Path, overwrite: bool = True) -> Path:
    if not result_dirs:
        raise UserError("compare: name at least one eval folder (eval/results/<experiment>)")
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
    from spark_quant.evaluate import stage_python

    if not experiments:
        raise UserError("sweep: name at least one experiment YAML (EXPERIMENTS=\"a.yaml b.yaml\")")
    exps = [load_experiment(Path(e), overrides) for e in experiments]  # validate them all before any work
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
