"""The embedded proxy model: Spark-TTS layout, exact configs, deterministic weights, caching."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from spark_quant import spark
from spark_quant.errors import UserError
from spark_quant.models.proxy import PROXY_SIZES, build_proxy, parameter_count, proxy_config

# Spark-TTS-0.5B's LLM/config.json values, as /work/shared/spark-tts-facts.md lists them.
SPARK_FACTS = {
    "vocab_size": 166000,
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 21,
    "hidden_act": "silu",
}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(module_tmp_path):
    return build_proxy(module_tmp_path / "Spark-TTS-tiny", "tiny", seed=0)


def test_import_is_cheap():
    code = (
        "import sys, spark_quant.models.proxy, spark_quant.models.tokenizer; "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'vllm', 'llmcompressor') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_full_config_is_spark_tts():
    assert PROXY_SIZES["full"] == SPARK_FACTS
    cfg = proxy_config("full")
    for key, want in SPARK_FACTS.items():
        if key == "torch_dtype":
            assert str(cfg.dtype) == "torch.bfloat16"
        elif key == "rope_theta":
            assert cfg.rope_parameters["rope_theta"] == want
        elif key == "sliding_window":
            continue  # transformers 5 nulls it when use_sliding_window is off; config.json keeps 32768
        else:
            assert getattr(cfg, key) == want, key
    assert cfg.architectures == ["Qwen2ForCausalLM"] and cfg.model_type == "qwen2"
    assert cfg.hidden_size // cfg.num_attention_heads == 64


def test_full_parameter_count():
    import torch
    from transformers import Qwen2ForCausalLM

    assert parameter_count("full") == 506_634_112
    with torch.device("meta"):
        model = Qwen2ForCausalLM(proxy_config("full"))
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb and emb.shape == (166000, 896)


def test_tiny_config():
    tiny_cfg = PROXY_SIZES["tiny"]
    assert tiny_cfg["vocab_size"] == spark.VOCAB_SIZE and tiny_cfg["tie_word_embeddings"] is True
    assert tiny_cfg["hidden_size"] // tiny_cfg["num_attention_heads"] == 64
    assert set(tiny_cfg) == set(SPARK_FACTS)


def test_unknown_size():
    with pytest.raises(ValueError, match="tiny"):
        proxy_config("huge")
    with pytest.raises(ValueError):
        build_proxy("/nonexistent/never-created", "huge")


def test_tiny_layout(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["LLM", "PROXY.json", "config.yaml"]
    llm = tiny / "LLM"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (llm / name).is_file(), name
    assert not (llm / "generation_config.json").exists()  # the real LLM/ has none
    modes = {(llm / n).stat().st_mode & 0o777 for n in ("config.json", "model.safetensors", "tokenizer.json")}
    assert len(modes) == 1  # safetensors' 0600 is not left on the weights
    assert not list(tiny.parent.glob(".*tmp*"))  # temporary build dir renamed away

    yaml = (tiny / "config.yaml").read_text()
    for line in ("sample_rate: 16000", "latent_hop_length: 320", "ref_segment_duration: 6"):
        assert line in yaml.splitlines()
    assert "proxy" in yaml and "not the real" in yaml.lower()

    marker = json.loads((tiny / "PROXY.json").read_text())
    assert marker["size"] == "tiny" and marker["seed"] == 0 and marker["random_init"] is True
    assert marker["parameters"] == parameter_count("tiny")
    assert marker["model_safetensors_sha256"] == _sha256(llm / "model.safetensors")


def test_tiny_config_json(tiny):
    cfg = json.loads((tiny / "LLM" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["torch_dtype"] == "bfloat16"
    for key, want in PROXY_SIZES["tiny"].items():
        assert cfg[key] == want, key


def test_weights_fp32_on_disk(tiny):
    from safetensors import safe_open

    with safe_open(tiny / "LLM" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as embed_tokens
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [166000, 256]
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}


def test_tiny_loads_and_runs(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny / "LLM", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == 166000 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(tiny / "LLM")
    assert spark.tokenizer_problems(tok.get_vocab()) == []
    ids = tok(spark.controllable_prompt("Hi.", "female", "moderate", "moderate"), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 166000)
    assert torch.isfinite(logits).all()


def test_seed_determinism_and_cache(tiny, tmp_path):
    first = _sha256(tiny / "LLM" / "model.safetensors")

    again = build_proxy(tmp_path / "again", "tiny", seed=0)
    assert _sha256(again / "LLM" / "model.safetensors") == first

    other = build_proxy(tmp_path / "other", "tiny", seed=1)
    assert _sha256(other / "LLM" / "model.safetensors") != first

    # Same args again: cache hit, nothing rewritten.
    files = [again / "PROXY.json", again / "LLM" / "model.safetensors", again / "LLM" / "tokenizer.json"]
    mtimes = [p.stat().st_mtime_ns for p in files]
    t0 = time.perf_counter()
    assert build_proxy(again, "tiny", seed=0) == again
    assert time.perf_counter() - t0 < 0.5
    assert [p.stat().st_mtime_ns for p in files] == mtimes

    # Different seed at the same path: rebuilt and replaced.
    build_proxy(again, "tiny", seed=1)
    assert json.loads((again / "PROXY.json").read_text())["seed"] == 1
    assert _sha256(again / "LLM" / "model.safetensors") == _sha256(other / "LLM" / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_does_not_replace_foreign_dir(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a spark-quant proxy"):
        build_proxy(foreign, "tiny")
    assert (foreign / "keep.txt").read_text() == "x"
