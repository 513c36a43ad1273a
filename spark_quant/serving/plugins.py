"""vLLM general plugins named in a worker spec (``"plugins": ["module:function", ...]``), made visible to every
vLLM process: registered here, and, where spark-quant is only on PYTHONPATH (the offline GPU host), announced
through a temporary dist-info holding the ``vllm.general_plugins`` entry points, put on sys.path and PYTHONPATH
(the engine core and its workers are separate processes that load plugins by entry point)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path


def ensure_plugins(targets: list[str]) -> None:
    missing = []
    have = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    for target in targets:
        module, _, func = target.partition(":")
        getattr(importlib.import_module(module), func)()
        if target not in have:
            missing.append(target)
    if not missing:
        return
    root = Path(tempfile.mkdtemp(prefix="spark-quant-vllm-plugins-"))
    info = root / "spark_quant_serving_plugins-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spark-quant-serving-plugins\nVersion: 0.1.0\n")
    lines = "".join(f"spark_quant_{i} = {t}\n" for i, t in enumerate(missing))
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{lines}")
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
