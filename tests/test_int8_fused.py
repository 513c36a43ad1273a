"""The fused INT8 option's wiring (no GPU): which layers qualify, and what the engine spec gets."""

from __future__ import annotations

import json

from spark_quant.serving.int8_fused import ARCHITECTURE, PLUGIN, fusable


class CompressedTensorsW8A8Int8:  # stand-ins named as vLLM's classes: fusable() goes by the names
    def __init__(self, static=False, symmetric=True, kernel="CutlassInt8ScaledMMLinearKernel"):
        self.is_static_input_scheme, self.input_symmetric = static, symmetric
        self.kernel = type(kernel, (), {})()


class Linear:
    def __init__(self, scheme):
        self.scheme = scheme


def test_fusable_only_for_dynamic_symmetric_int8_on_cutlass():
    assert fusable(Linear(CompressedTensorsW8A8Int8())) is None
    assert "dynamic" in fusable(Linear(CompressedTensorsW8A8Int8(static=True)))
    assert "dynamic" in fusable(Linear(CompressedTensorsW8A8Int8(symmetric=False)))
    assert "TritonInt8" in fusable(Linear(CompressedTensorsW8A8Int8(kernel="TritonInt8ScaledMMLinearKernel")))
    assert "not compressed-tensors W8A8 INT8" in fusable(Linear(None))


def _ckpt(tmp_path, quant):
    d = tmp_path / ("int8" if quant else "bf16")
    d.mkdir()
    cfg = {"architectures": ["Qwen2ForCausalLM"]}
    if quant:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int",
                                                                             "dynamic": True}}}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_worker_spec_serves_int8_checkpoints_fused_and_the_baseline_unchanged(tmp_path):
    from conftest import ROOT

    from spark_quant.config import load_experiment
    from spark_quant.serving.client import worker_spec

    exp = load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml", ["eval.int8_fused=true"])
    q = worker_spec(exp, _ckpt(tmp_path, True), "bfloat16")
    assert q["plugins"] == [PLUGIN]
    assert q["engine_overrides"]["hf_overrides"] == {"architectures": [ARCHITECTURE]}
    b = worker_spec(exp, _ckpt(tmp_path, False), "bfloat16")
    assert b["plugins"] == [] and "hf_overrides" not in b["engine_overrides"]
    off = worker_spec(load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml"), tmp_path / "int8", "bfloat16")
    assert off["plugins"] == []  # the option is off by default


def test_topology_options_reach_the_engine(tmp_path):
    from conftest import ROOT

    from spark_quant.config import load_experiment
    from spark_quant.serving.client import worker_spec

    exp = load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml",
                          ["eval.executor_backend=mp", "eval.data_parallel_size=2", "eval.replicas=3"])
    spec = worker_spec(exp, _ckpt(tmp_path, False), "bfloat16")
    assert spec["engine_overrides"]["distributed_executor_backend"] == "mp"
    assert spec["engine_overrides"]["data_parallel_size"] == 2
    assert exp.eval.replicas == 3
    default = worker_spec(load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml"), tmp_path / "bf16", "bfloat16")
    assert "distributed_executor_backend" not in default["engine_overrides"]
    assert "data_parallel_size" not in default["engine_overrides"]
