"""Deterministic GPU kernels for a run that must be reproducible from its seed (the trained proxy's training)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def deterministic_kernels(on: bool) -> Iterator[list[str]]:
    """PyTorch's deterministic algorithms for one training run, warn-only: an op with no deterministic kernel warns
    instead of failing the build. Yields the distinct warnings, for PROXY.json. cuBLAS needs its fixed workspace
    set before its first call in the process (``CUBLAS_WORKSPACE_CONFIG``); a setting already there is kept.

    Attention runs on SDPA's math backend inside: in warn-only mode the flash and memory-efficient backward
    passes stay non-deterministic (they switch only in strict mode, which would also refuse CUDA's NLLLoss), and
    the math backend is matmuls and a softmax."""
    import warnings

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not on:
        yield []
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    seen: list[str] = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.MATH]):
            warnings.simplefilter("always")
            yield seen
        seen.extend(dict.fromkeys(str(w.message).split("\n")[0][:200] for w in caught
                                  if "determinis" in str(w.message)))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
