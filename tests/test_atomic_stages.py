"""Atomic stages: a run killed with SIGKILL never leaves a folder that looks finished, and never harms a good one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from spark_quant.artifacts import read_manifest, verify_files, write_manifest
from spark_quant.errors import UserError
from spark_quant.outputs import stage_folder


def test_stage_folder_keeps_the_old_result_when_the_stage_raises(tmp_path):
    out = tmp_path / "stage"
    with stage_folder(out, overwrite=False, stage="x") as tmp:
        (tmp / "a.txt").write_text("good")
        write_manifest(tmp, "x", {}, {"k": 1}, time.time())
    with pytest.raises(RuntimeError):
        with stage_folder(out, overwrite=True, stage="x") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed midway")
    assert (out / "a.txt").read_text() == "good" and read_manifest(out)["stage"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_manifest_hashes_catch_edits_and_truncation(tmp_path):
    out = tmp_path / "stage"
    with stage_folder(out, overwrite=False, stage="x") as tmp:
        (tmp / "w.bin").write_bytes(b"x" * 1000)
        write_manifest(tmp, "x", {}, {}, time.time())
    verify_files(out)
    with open(out / "w.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="sha256 differs"):
        verify_files(out)


def _kill_during(args: list[str], marker: Path, glob: str, timeout: float = 300) -> None:
    """Start `spark-quant ARGS`, held just before its manifest (every file written, none finished); SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, "-m", "spark_quant", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "SPARK_QUANT_TEST_PAUSE_BEFORE_MANIFEST": "60"})
    t0 = time.time()
    while not list(marker.glob(glob + "/.paused")):
        assert proc.poll() is None, "stage finished before it could be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.e2e
def test_sigkill_during_calibrate_leaves_previous_result_and_rerun_finishes(tiny_proxy, tmp_path):
    out = tmp_path / "cal"
    fast = ["--set", "calibration.num_samples=8", "--set", "calibration.num_references=2"]
    run_cli("calibrate", "--model", str(tiny_proxy), "--out", str(out), *fast)
    before = (out / "samples.jsonl").read_bytes()
    _kill_during(["calibrate", "--model", str(tiny_proxy), "--out", str(out), *fast, "--overwrite",
                  "--set", "calibration.seed=3"], tmp_path, ".cal.tmp-*")
    assert (out / "samples.jsonl").read_bytes() == before and read_manifest(out) is not None
    verify_files(out)
    # the killed run's leftovers are cleaned by the next run, which finishes the job
    run_cli("calibrate", "--model", str(tiny_proxy), "--out", str(out), *fast, "--overwrite", "--set", "calibration.seed=3")
    assert (out / "samples.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]


@pytest.mark.e2e
def test_sigkill_during_quantize_never_leaves_a_finished_looking_checkpoint(tiny_proxy, tmp_path):
    pytest.importorskip("llmcompressor")
    cal, ckpt = tmp_path / "cal", tmp_path / "ckpt"
    # round-to-nearest W8A8 (no GPTQ): what is tested is the folder's atomicity, so the quantization may be quick
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
                      "      ignore: [lm_head]\n      scheme: W8A8\n")
    fast = ["--set", "calibration.num_samples=8", "--set", "calibration.clone_fraction=0", "--recipe", str(recipe)]
    run_cli("calibrate", "--model", str(tiny_proxy), "--out", str(cal), *fast)
    _kill_during(["quantize", "--model", str(tiny_proxy), "--calibration", str(cal), "--out", str(ckpt), *fast],
                 tmp_path, ".ckpt.tmp-*")
    assert not ckpt.exists()
    run_cli("quantize", "--model", str(tiny_proxy), "--calibration", str(cal), "--out", str(ckpt), *fast)
    man = json.loads((ckpt / "manifest.json").read_text())
    verify_files(ckpt, man)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal", "ckpt", "rtn.yaml"]  # the killed run's temp is gone
