"""Finding and checking a Spark-TTS model folder (real or the embedded proxy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.errors import UserError


def llm_dir(model_dir: Path) -> Path:
    """The ``LLM/`` folder of a Spark-TTS model folder, checked for the files vLLM and transformers need."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"{model_dir}: model folder not found; set MODEL= (or `model:`) to a Spark-TTS-0.5B folder")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a folder; MODEL must be a Spark-TTS folder containing LLM/")
    llm = model_dir / "LLM"
    if not (llm / "config.json").is_file():
        raise UserError(f"{model_dir}: no LLM/config.json; MODEL must be a Spark-TTS folder (config.yaml, LLM/, BiCodec/)")
    return llm


def read_config(llm: Path) -> dict[str, Any]:
    path = Path(llm) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); restore the model's config.json") from None
    if cfg.get("model_type") != "qwen2" or "Qwen2ForCausalLM" not in cfg.get("architectures", []):
        raise UserError(
            f"{path}: model_type {cfg.get('model_type')!r} / architectures {cfg.get('architectures')}: "
            "not a Qwen2ForCausalLM, so not a Spark-TTS LLM"
        )
    if cfg.get("vocab_size", 0) < spark.SPARK_LAST_ID + 1:
        raise UserError(
            f"{path}: vocab_size {cfg.get('vocab_size')} is smaller than Spark-TTS's {spark.SPARK_LAST_ID + 1} tokens"
        )
    return cfg


def check_weights_shape(llm: Path, cfg: dict[str, Any]) -> None:
    """The embedding's row count must equal config.vocab_size (reads the safetensors header only)."""
    files = sorted(Path(llm).glob("*.safetensors"))
    if not files:
        raise UserError(f"{llm}: no *.safetensors weights; the LLM folder is incomplete")
    for f in files:
        with _open_safetensors(f) as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    rows = st.get_slice(key).get_shape()[0]
                    if rows != cfg["vocab_size"]:
                        raise UserError(
                            f"{llm}/config.json: vocab_size {cfg['vocab_size']} disagrees with the embedding's "
                            f"{rows} rows in {f.name}; the config and weights are from different models"
                        )
                    return
    raise UserError(f"{llm}: no embed_tokens.weight in the safetensors files; not a Qwen2 checkpoint")


def _open_safetensors(path: Path):
    """``safe_open`` whose failure (a truncated or corrupt download) names the file."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # SafetensorError, OSError: the header cannot be read
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); it is truncated "
                        "or corrupt: download or copy it again") from None


def check_not_quantized(llm: Path, cfg: dict[str, Any]) -> None:
    """A stage's source model is the unquantized one: a checkpoint given as --model would be re-quantized
    (or its INT8 weights fed to BF16 matmuls)."""
    qc = cfg.get("quantization_config")
    if qc:
        raise UserError(f"{llm}/config.json: already quantized ({qc.get('quant_method', 'quantization_config')}); "
                        "give the source (unquantized) Spark-TTS model as --model / model:, and a checkpoint only "
                        "as --checkpoint")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # the fast tokenizer, or the slow one's vocabulary


def load_tokenizer(llm: Path):
    """Load the LLM's tokenizer and refuse one without Spark-TTS's tokens at Spark-TTS's ids."""
    from transformers import AutoTokenizer

    if not any((Path(llm) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{llm}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
                        "Spark-TTS-0.5B/LLM into it")

    try:
        tok = AutoTokenizer.from_pretrained(str(llm))
    except Exception as e:  # transformers raises many types here
        raise UserError(f"{llm}: tokenizer could not be loaded ({str(e).splitlines()[0][:200]})") from None
    problems = spark.tokenizer_problems(tok.get_vocab())
    if problems:
        raise UserError(
            f"{llm}: tokenizer is not Spark-TTS's ({problems[0]}); use the tokenizer shipped in Spark-TTS-0.5B/LLM"
        )
    return tok


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """What identifies a model: its LLM config and the size + sha256 of each file in ``LLM/`` (digests cached
    by size and mtime, so a model is hashed once). Not its path and not its mtimes: a copied or moved
    checkout is the same model, and its stages stay up to date."""
    from spark_quant.artifacts import sha256_cached

    llm = Path(model_dir) / "LLM"
    files = {p.name: [p.stat().st_size, sha256_cached(p)] for p in sorted(llm.iterdir())
             if p.is_file() and not p.name.startswith(".")}
    proxy = Path(model_dir) / "PROXY.json"
    marker = json.loads(proxy.read_text()) if proxy.is_file() else None
    if isinstance(marker, dict):
        marker = {k: v for k, v in marker.items() if k not in ("build_seconds", "train_seconds")}
    return {"config": json.loads((llm / "config.json").read_text()), "files": files, "proxy": marker}
