"""The project's embedded default model: a random-initialized Spark-TTS stand-in.

The real Spark-TTS-0.5B weights are not available here, so the pipeline runs on
a proxy with the same directory layout (``config.yaml`` + ``LLM/``), the same
tokenizer and ids, and the same Qwen2 architecture: ``full`` has Spark-TTS's
exact LLM config (506,634,112 parameters), ``tiny`` shrinks the transformer so
GPTQ and vLLM run in seconds on a small CPU while keeping vocab 166000, tied
embeddings and head_dim 64. Weights are random (seeded), so outputs are not
speech; the proxy exercises the pipeline, not audio quality.

torch and transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from spark_quant import spark
from spark_quant.artifacts import sha256_file
from spark_quant.errors import UserError
from spark_quant.models.tokenizer import build_spark_tokenizer
from spark_quant.outputs import atomic_folder, remove_dead_temporaries

if TYPE_CHECKING:
    from transformers import Qwen2Config

# Spark-TTS-0.5B's LLM/config.json, field for field (see /work/shared/spark-tts-facts.md).
_FULL = {
    "vocab_size": spark.VOCAB_SIZE,
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": spark.BOS_ID,
    "eos_token_id": spark.EOS_ID,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 21,
    "hidden_act": "silu",
}

# Same family and vocabulary, small enough for llm-compressor GPTQ and vLLM on a 2-core CPU.
# head_dim stays 64 (hidden_size / num_attention_heads) for vLLM's CPU attention.
_TINY = _FULL | {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 768,
    "max_position_embeddings": 4096,
    "sliding_window": 4096,
    "max_window_layers": 4,
}

PROXY_SIZES: dict[str, dict] = {"tiny": _TINY, "full": _FULL}

PROXY_MARKER = "PROXY.json"
ARCHITECTURE = "Qwen2ForCausalLM"
# Spark-TTS's top-level config.yaml values the pipeline reads.
AUDIO_CONFIG = {"sample_rate": spark.SAMPLE_RATE, "latent_hop_length": 320, "ref_segment_duration": 6}


def check_size(size: str) -> dict:
    if size not in PROXY_SIZES:
        raise ValueError(f"proxy size must be one of {sorted(PROXY_SIZES)}, got {size!r}")
    return PROXY_SIZES[size]


def proxy_config(size: str = "tiny") -> Qwen2Config:
    """The transformers ``Qwen2Config`` of a proxy size (``full`` = Spark-TTS-0.5B's LLM config)."""
    from transformers import Qwen2Config

    kwargs = dict(check_size(size))
    kwargs["dtype"] = kwargs.pop("torch_dtype")  # transformers 5 name; config.json also gets torch_dtype
    return Qwen2Config(architectures=[ARCHITECTURE], **kwargs)


def parameter_count(size: str = "tiny") -> int:
    """Parameters of a proxy size (tied embedding counted once), without allocating weights."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(proxy_config(size))
    return sum(p.numel() for p in model.parameters())


def _config_json(size: str, config: Qwen2Config) -> dict:
    """config.json as transformers' save_pretrained writes it, plus the real file's older spellings."""
    d = json.loads(config.to_json_string())
    facts = PROXY_SIZES[size]
    # Spark-TTS's file has torch_dtype, top-level rope_theta and sliding_window 32768; transformers 5
    # writes dtype / rope_parameters and nulls sliding_window when use_sliding_window is off.
    # transformers 5 reads either spelling; older readers (and people) see the real file's keys.
    for key in ("torch_dtype", "rope_theta", "sliding_window"):
        d[key] = facts[key]
    return dict(sorted(d.items()))


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / PROXY_MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_built(out: Path, size: str, seed: int) -> bool:
    marker = read_marker(out)
    return bool(marker) and marker.get("size") == size and marker.get("seed") == seed


def write_weights(llm_dir: Path, size: str, seed: int) -> int:
    """Seeded random init, saved as FP32 safetensors (tied lm_head not stored, like the real file)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    config = proxy_config(size)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # FP32 parameters on CPU; transformers' default init, global RNG
    n_params = sum(p.numel() for p in model.parameters())
    state = model.state_dict()  # views of the parameters, no copies
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtypes = sorted({str(t.dtype) for t in state.values()})
    if dtypes != ["torch.float32"]:
        raise RuntimeError(f"expected FP32 weights, got {dtypes}")
    config_path, weights_path = llm_dir / "config.json", llm_dir / "model.safetensors"
    config_path.write_text(json.dumps(_config_json(size, config), indent=2) + "\n")
    save_file(state, str(weights_path), metadata={"format": "pt"})
    del model, state
    # safetensors creates the file 0600; give it the umask-derived mode the other files got.
    os.chmod(weights_path, config_path.stat().st_mode & 0o777)
    return n_params


def config_yaml(size: str) -> str:
    lines = [
        "# spark-quant proxy: random-initialized stand-in for Spark-TTS-0.5B, NOT the real model",
        "# (LLM/ has random weights; there is no BiCodec or wav2vec2, so it cannot make speech).",
        *(f"{k}: {v}" for k, v in AUDIO_CONFIG.items()),
        f'spark_quant_proxy: "{size} proxy, not the real Spark-TTS-0.5B model"',
    ]
    return "\n".join(lines) + "\n"


def built_facts(size: str, llm: Path, started: float) -> dict:
    """What every proxy's PROXY.json records about the weights written to ``llm`` (written last)."""
    import torch
    import transformers

    return {"weights_dtype": "float32", "config": PROXY_SIZES[size],
            "model_safetensors_sha256": sha256_file(llm / "model.safetensors"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "build_seconds": round(time.perf_counter() - started, 2)}


def build_proxy(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a Spark-TTS-shaped model directory at ``out`` and return ``out``.

    Layout: ``out/config.yaml``, ``out/LLM/`` (config.json, model.safetensors in FP32,
    tokenizer files) and ``out/PROXY.json``. Same ``size`` and ``seed`` give a
    byte-identical model.safetensors (same torch version). If ``out`` already holds
    a proxy of this size and seed it is returned as is. The build happens in a
    temporary sibling directory that is renamed into place, so ``out`` is never
    half-written; a folder at ``out`` that is not a proxy is never replaced.
    """
    check_size(size)
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    out = Path(out)
    remove_dead_temporaries(out)  # a build killed with -9 left its temporary folder (GBs for the full proxy)
    if _is_built(out, size, seed):
        return out
    if out.exists() and read_marker(out) is None:
        raise UserError(f"{out}: exists and is not a spark-quant proxy ({PROXY_MARKER} missing); refusing to replace "
                        "it: choose another folder")

    with atomic_folder(out, PROXY_MARKER, lambda o: _is_built(o, size, seed)) as tmp:
        started = time.perf_counter()
        llm = tmp / "LLM"
        llm.mkdir(parents=True)
        n_params = write_weights(llm, size, seed)
        build_spark_tokenizer(llm)
        (tmp / "config.yaml").write_text(config_yaml(size))


        marker = {
            "proxy": "spark-quant",
            "note": "random-initialized stand-in for Spark-TTS-0.5B's LLM; not the real model, outputs are not speech",
            "size": size,
            "seed": seed,
            "random_init": True,
            "init": "torch.manual_seed(seed); transformers Qwen2ForCausalLM(config) default init",
            "parameters": n_params,
            **built_facts(size, llm, started),
        }
        # Written last: a folder with PROXY.json is complete.
        (tmp / PROXY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out
