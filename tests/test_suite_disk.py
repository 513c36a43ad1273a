"""The suite's disk guard (conftest.py): a run with model work on a disk that cannot hold it stops at once with
one line, instead of failing test after test with ENOSPC; quick tests are not held up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT, disk_shortfall

# a test with model work (test_audio.py's tests use the codec: e2e) and a quick one
E2E_TEST = "tests/test_audio.py::test_wav_files_are_16khz_mono_pcm_of_semantic_tokens_over_50_seconds"
QUICK_TEST = "tests/test_suite_disk.py::test_shortfall_names_the_folder_and_the_free_space"


def test_shortfall_names_the_folder_and_the_free_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free / 2**30
    assert disk_shortfall(tmp_path, 0.0) is None
    line = disk_shortfall(tmp_path, free + 10)
    assert line.startswith(f"{tmp_path}: ") and "GiB free" in line and "--basetemp" in line and "\n" not in line


def _pytest(*args: str, need_gb: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not one of this run's workers
    env["SPARK_QUANT_TEST_DISK_GB"] = need_gb
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_model_work_on_a_disk_too_small_stops_before_any_test_with_one_line():
    for args in ([E2E_TEST], ["-n", "2", E2E_TEST]):  # alone, and under xdist (the controller checks)
        proc = _pytest(*args, need_gb="1000000")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4, out[-2000:]
        assert "GiB free, the test suite needs about 1000000 GiB there" in out and "INTERNALERROR" not in out
        assert " passed" not in out and " failed" not in out


def test_quick_tests_run_on_a_small_disk():
    for args in ([QUICK_TEST], ["-n", "2", "-m", "not e2e", QUICK_TEST]):
        proc = _pytest(*args, need_gb="1000000")
        assert proc.returncode == 0 and "1 passed" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]
