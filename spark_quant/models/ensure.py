"""The model a stage works on: the user's Spark-TTS folder, or the embedded proxy built on first use."""

from __future__ import annotations

from pathlib import Path

from spark_quant.models.folder import check_not_quantized, check_weights_shape, llm_dir, read_config


def ensure_model(model_dir: Path, is_proxy: bool, proxy_size: str, proxy_seed: int,
                 proxy_weights: str = "random") -> Path:
    """Build the embedded proxy (random or trained weights) if it is the model and is missing; return the LLM folder."""
    if is_proxy and proxy_weights == "trained":
        from spark_quant.models.trained import build_trained_proxy

        build_trained_proxy(model_dir, size=proxy_size, seed=proxy_seed)
    elif is_proxy:
        from spark_quant.models.proxy import build_proxy

        build_proxy(model_dir, size=proxy_size, seed=proxy_seed)
    llm = llm_dir(model_dir)
    cfg = read_config(llm)
    check_not_quantized(llm, cfg)
    check_weights_shape(llm, cfg)
    return llm
