"""Stage 2: apply an llm-compressor recipe and save a compressed-tensors checkpoint.

Runs in the *quantization* environment (llm-compressor). The recipe is any
llm-compressor YAML, used unchanged by ``oneshot(recipe=path)``. The output
keeps the Spark-TTS layout: ``LLM/`` is the quantized checkpoint, everything
else (config.yaml, BiCodec/, wav2vec2-large-xlsr-53/) is linked or copied
from the source model, so existing Spark-TTS code loads it unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import link_or_copy, require_manifest, sha256_file, write_manifest
from spark_quant.config import Experiment
from spark_quant.errors import UserError
from spark_quant.models.ensure import ensure_model
from spark_quant.models.folder import load_tokenizer, model_fingerprint
from spark_quant.outputs import begin_stage, stage_folder
from spark_quant.spark.corpus import SAMPLES
from spark_quant.stages.recipes import load_recipe
from spark_quant.stages.upstream import (
    check_calibration,
    check_degradations,
    degradations,
    llmcompressor_warnings,
)


def check_recipe_targets(recipe, recipe_path: Path, llm: Path) -> dict[str, int]:
    """Refuse a recipe whose quantization modifiers match no layer of the model, before any work.

    The model is built on the meta device from its config.json (no weights read), and each
    modifier's ``targets`` / ``ignore`` (or its config_groups' targets) are resolved with
    compressed-tensors' own matcher, as llm-compressor does. Returns layers matched per modifier.
    """
    import torch
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(llm)))
    matched: dict[str, int] = {}
    for m in recipe.modifiers:
        targets = getattr(m, "targets", None)
        groups = getattr(m, "config_groups", None) or {}
        if groups:
            targets = [t for g in groups.values() for t in (g.get("targets") if isinstance(g, dict) else g.targets)]
        if targets is None or not hasattr(m, "ignore"):
            continue  # e.g. SmoothQuant: mappings are inferred by llm-compressor
        targets = [targets] if isinstance(targets, str) else list(targets)
        ignore = list(m.ignore or [])
        n = sum(1 for _ in match_named_modules(model, targets, ignore))
        name = type(m).__name__
        if n == 0:
            raise UserError(f"{recipe_path}: {name}: targets {targets} (ignore {ignore}) match no layer of the model; "
                            "Qwen2 layers are Linear modules named like model.layers.0.mlp.down_proj")
        matched[name] = n
    return matched


def _weights_summary(llm: Path) -> dict[str, Any]:
    """Bytes by dtype, with the lm_head / embedding counted apart (safetensors headers only)."""
    from safetensors import safe_open

    by_dtype: dict[str, int] = {}
    keys: list[str] = []
    embed = 0
    for f in sorted(Path(llm).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shape = sl.get_shape()
                dtype = sl.get_dtype()
                n = 1
                for d in shape:
                    n *= d
                size = n * _DT_BYTES.get(dtype, 4)
                by_dtype[dtype] = by_dtype.get(dtype, 0) + size
                keys.append(k)
                if "embed_tokens" in k or k.startswith("lm_head"):
                    embed += size
    return {"bytes_by_dtype": by_dtype, "total_bytes": sum(by_dtype.values()), "embedding_and_head_bytes": embed,
            "tensors": len(keys), "has_separate_lm_head": any(k.startswith("lm_head") for k in keys)}


_DT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def check_checkpoint(llm: Path) -> dict[str, Any]:
    """What was produced: compressed-tensors format, lm_head left alone, embeddings still tied."""
    cfg = json.loads((Path(llm) / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise UserError(f"{llm}/config.json: no compressed-tensors quantization_config; the recipe quantized nothing")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UserError(f"{llm}/config.json: quantization_config has no config_groups; the recipe targeted no layer")
    ignore = qc.get("ignore") or []
    weights = _weights_summary(llm)
    tied = bool(cfg.get("tie_word_embeddings"))
    if tied and weights["has_separate_lm_head"] and "lm_head" in ignore:
        raise UserError(f"{llm}: tie_word_embeddings is true but an lm_head tensor was saved; ties were broken")
    return {
        "format": qc.get("format"),
        "config_groups": groups,
        "ignore": ignore,
        "lm_head_ignored": "lm_head" in ignore,
        "tie_word_embeddings": tied,
        "weights": weights,
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def copy_tokenizer_files(src_llm: Path, dst_llm: Path) -> None:
    """Copy the source tokenizer byte for byte (re-saving through transformers 5 rewrites its config in a
    form older transformers, which Spark-TTS's own code uses, may not load); drop the generation_config.json
    that save_pretrained adds when the source has none, so the LLM/ folder keeps the source's layout."""
    for name in TOKENIZER_FILES:
        if (Path(src_llm) / name).is_file():
            link_or_copy(Path(src_llm) / name, Path(dst_llm) / name)
    if not (Path(src_llm) / "generation_config.json").is_file():
        (Path(dst_llm) / "generation_config.json").unlink(missing_ok=True)


def quantize(exp: Experiment, calib_dir: Path | None = None, out: Path | None = None, overwrite: bool = False) -> Path:
    calib_dir, calib_derived = exp.folder(calib_dir, exp.calibration_dir)
    out, derived = exp.folder(out, exp.checkpoint_dir)
    model_dir, is_proxy = exp.resolved_model()
    recipe_path = Path(exp.recipe)
    recipe = load_recipe(recipe_path)  # fail fast, before any model is loaded
    calib = require_manifest(calib_dir, "calibrate", "run `make calibrate` (spark-quant calibrate) first")
    samples = calib_dir / SAMPLES
    if not samples.is_file() or sha256_file(samples) != calib.get("samples_sha256"):
        raise UserError(f"{samples}: does not match its manifest's sha256 (edited by hand?); rerun `make calibrate`")
    llm = ensure_model(model_dir, is_proxy, exp.proxy_size, exp.proxy_seed, exp.proxy_weights)
    check_recipe_targets(recipe, recipe_path, llm)
    if calib_derived:  # the pipeline's calibration must be the one the experiment asks for
        check_calibration(exp, model_dir, calib_dir, calib)

    inputs = {
        "recipe": recipe_path.read_text(encoding="utf-8"),
        "recipe_path": str(recipe_path),
        "calibration_sha256": calib["samples_sha256"],
        "model": model_fingerprint(model_dir),
        "max_seq_length": exp.calibration.max_seq_length,
        "batch_size": exp.calibration.batch_size,
        "calibration_fingerprint": calib.get("inputs_fingerprint"),
        "allow_fallback": exp.quantize_allow_fallback,
    }
    if begin_stage(out, "quantize", inputs, overwrite, derived, sources=[model_dir, calib_dir, recipe_path],
                   reuse=True, updates={"calibration_dir": str(calib_dir.resolve())}):
        return out
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    started = time.time()
    load_tokenizer(llm)  # refuse a tokenizer without Spark-TTS's tokens before any work
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    bs = exp.calibration.batch_size
    dropped = 0
    if bs > 1:  # batches of similar lengths: llm-compressor's collator truncates each to its shortest sample
        rows.sort(key=lambda r: len(r["input_ids"]))
        lens = [min(len(r["input_ids"]), exp.calibration.max_seq_length) for r in rows]
        dropped = sum(sum(b) - min(b) * len(b) for b in (lens[i:i + bs] for i in range(0, len(lens), bs)))
    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                            "attention_mask": [r["attention_mask"] for r in rows]})
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.bfloat16)
    if cuda:
        model = model.to("cuda")
    t_load = time.time() - started
    t0 = time.time()
    with llmcompressor_warnings() as warnings:
        oneshot(
            model=model,
            dataset=ds,
            recipe=str(recipe_path),
            max_seq_length=exp.calibration.max_seq_length,
            num_calibration_samples=len(ds),
            shuffle_calibration_samples=False,
            batch_size=bs,
        )
    t_oneshot = time.time() - t0
    fallbacks = degradations(warnings)
    check_degradations(fallbacks, exp, recipe_path)  # before anything is written

    with stage_folder(out, overwrite=overwrite, stage="quantize", replace_stale=derived) as tmp:
        for item in sorted(Path(model_dir).iterdir()):
            if item.name in ("LLM", "manifest.json", "PROXY.json") or item.name.startswith("."):
                continue
            link_or_copy(item, tmp / item.name)
        t0 = time.time()
        model.save_pretrained(str(tmp / "LLM"), save_compressed=True)
        copy_tokenizer_files(llm, tmp / "LLM")
        t_save = time.time() - t0
        check = check_checkpoint(tmp / "LLM")
        src_weights = _weights_summary(llm)
        write_manifest(
            tmp, "quantize", exp.model_dump(mode="json"), inputs, started,
            extra={
                "model_dir": str(model_dir),
                "model_is_proxy": is_proxy,
                "calibration_dir": str(calib_dir.resolve()),  # eval reads its references from any folder
                "num_calibration_samples": len(ds),
                "calibration_batch_size": bs,
                "calibration_tokens_dropped_by_batching": dropped,
                "timings": {"load_s": round(t_load, 2), "oneshot_s": round(t_oneshot, 2), "save_s": round(t_save, 2)},
                "check": check,
                "source_weights": src_weights,
                "fallbacks": fallbacks,
                "warnings": warnings,
            },
        )
    print(f"quantize: wrote {out} (format {check['format']}, lm_head ignored: {check['lm_head_ignored']}, "
          f"oneshot {t_oneshot:.1f}s, llm-compressor warnings: {len(warnings)}, fallbacks: {len(fallbacks)})")
    for f in fallbacks:
        print(f"quantize: FALLBACK (allowed by quantize_allow_fallback): {f[:300]}")
    return out
