"""On a CUDA GPU: the W8A8 checkpoint is served by vLLM's Cutlass INT8 kernel and agrees with BF16.

Skipped on machines without a GPU (CI); run on a GPU host with `pytest -m requires_gpu` in an environment
that has both llm-compressor and vLLM on its path for the quantize and eval stages (eval/gpu_measure.sh's).
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.requires_gpu, pytest.mark.e2e]


def test_w8a8_checkpoint_runs_on_cutlass_int8_on_the_gpu(tiny_w8a8, tmp_path):
    from spark_quant.serving.client import EXPECTED_KERNEL, run_worker

    prompts = [[151644, 872, 198] * 4]
    spec = {"model": str(tiny_w8a8["ckpt"] / "LLM"), "dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 4,
            "gpu_memory_utilization": 0.2, "enforce_eager": True, "seed": 0,
            "tasks": [{"name": "greedy", "kind": "greedy", "prompts": prompts, "max_tokens": 16, "ignore_eos": True}]}
    res = run_worker(spec, tmp_path, "gpu-int8", timeout_s=900)
    assert res.get("ok"), res.get("error")
    assert any(k.startswith(EXPECTED_KERNEL["cuda"]) for k in res["kernels"]), res["kernels"]
    assert len(res["tasks"]["greedy"]["outputs"][0]["tokens"]) == 16
    json.dumps(res)  # the result is plain JSON, as the eval stage stores it
