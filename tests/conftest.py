"""Shared fixtures: the tiny proxy is built once per session, in a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def serve_python() -> str | None:
    """The serving environment's interpreter, if there is one with vLLM."""
    for cand in (os.environ.get("SERVE_PYTHON"), str(ROOT / ".venv/serve/bin/python")):
        if cand and not Path(cand).is_absolute() and os.sep in cand:
            cand = os.path.abspath(ROOT / cand)  # the Makefile exports it relative to the repo root (no resolve: venv symlink)
        if cand and Path(cand).exists():
            ok = subprocess.run([cand, "-c", "import vllm"], capture_output=True, cwd=ROOT).returncode == 0
            if ok:
                return cand
    return None


def run_cli(*args: str, python: str | None = None, check: bool = True, env: dict | None = None, timeout=1800,
            cwd: Path = ROOT):
    """Run `python -m spark_quant ARGS` from the repo root; return the CompletedProcess."""
    proc = subprocess.run(
        [python or sys.executable, "-m", "spark_quant", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"spark-quant {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_proxy(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from spark_quant.models.proxy import build_proxy

    cached = ROOT / "build/proxy/Spark-TTS-proxy-tiny-s0"
    out = tmp_path_factory.mktemp("proxy") / "Spark-TTS-proxy-tiny-s0"
    if (cached / "PROXY.json").is_file():  # reuse the Makefile's build: same seed, same bytes
        shutil.copytree(cached, out)
        return out
    return build_proxy(out, size="tiny", seed=0)


@pytest.fixture(scope="session")
def trained_proxy(tmp_path_factory) -> Path:
    """The trained tiny proxy (spark_quant/models/trained.py): build/proxy's copy if `make` built it, else trained here."""
    pytest.importorskip("torch")
    from spark_quant.models.trained import build_trained_proxy, is_trained_proxy

    name = "Spark-TTS-proxy-tiny-trained-s0"
    cached = ROOT / "build/proxy" / name
    out = tmp_path_factory.mktemp("trained-proxy") / name
    if is_trained_proxy(cached, "tiny", 0):
        shutil.copytree(cached, out)
        return out
    return build_trained_proxy(out, size="tiny", seed=0, corpus_path=ROOT / "calibration/texts/train.txt",
                               heldout_path=ROOT / "calibration/texts/heldout.txt")


@pytest.fixture(autouse=True)
def _no_files_left_in_repo():
    """Tests write under tmp_path only: the repo's tracked tree and output folders stay as they were."""
    watched = [ROOT / d for d in ("calibration/runs", "checkpoints", "eval/results")]
    before = {d: sorted(p.name for p in d.iterdir()) if d.is_dir() else None for d in watched}
    yield
    after = {d: sorted(p.name for p in d.iterdir()) if d.is_dir() else None for d in watched}
    assert before == after, f"a test left files in the repo: {after}"
