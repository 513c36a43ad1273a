"""The environment every serving process starts with (one-shot workers, long-lived sessions, pool replicas).

NVLink multicast stays off in NCCL, PyTorch and NVSHMEM whatever the caller's environment or a spec's ``env``
says: on a host whose GPUs others share, a program that uses it can put them out of service (the GPU hosts'
rule; it matters once ``data_parallel_size`` or tensor parallelism spans several GPUs). These three are set last.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULTS = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def serving_env(*overrides: Mapping[str, Any] | None) -> dict[str, str]:
    """os.environ, the serving defaults, then each mapping in ``overrides`` (a spec's ``env``...), then
    NO_MULTICAST, which nothing overrides."""
    env = {**os.environ, **DEFAULTS}
    for extra in overrides:
        env.update({k: str(v) for k, v in (extra or {}).items()})
    env.update(NO_MULTICAST)
    return env
