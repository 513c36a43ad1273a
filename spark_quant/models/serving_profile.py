"""Spark serving profile: a checkpoint whose output head covers only the tokens Spark-TTS can emit.

Spark-TTS only ever emits ``spark.emittable_ids()`` (13,494 ids: the audio, label
and marker tokens 151665..165157 and EOS 151645), yet the tied 166000x896 head
computes, and the sampler sorts, all 166,000 logits every step. vLLM returns the
index into the logits row as the token id, so a narrower head needs those tokens
to be ids ``0..N-1``. The profile therefore renumbers the vocabulary by a swap:

    profile id k            <-> original id EMIT[k]   for k < N   (EMIT = Spark ids, then EOS)
    profile id EMIT[k]      <-> original id k         for k < N   (the displaced text tokens)
    every other id keeps its number

The swap is its own inverse. The transformed ``LLM/`` has the embedding rows
moved accordingly, an untied ``lm_head.weight`` of N rows (the original
embedding rows of the emittable tokens, in profile order), a tokenizer with the
permuted ids, ``architectures: [SparkQwen2ForCausalLM]`` (served by the vLLM
plugin in ``vllm_spark.py``), ``spark_emit_vocab_size: N`` and ``vocab_size``
unchanged (prompts still contain text tokens). ``LLM/spark_profile.json`` holds
the permutation. Callers that speak original ids map prompts with
``to_profile`` and outputs with ``to_original``.

Needs only torch, safetensors and json (runs in either environment).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from spark_quant.errors import UserError
from spark_quant.spark.permutation import (
    ARCHITECTURE,
    N_FIELD,
    PROFILE_MARKER,
    PROFILE_VERSION,
    Permutation,
)

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"


# --- weights ------------------------------------------------------------------------
def _quantized_head(cfg: dict[str, Any], keys: set[str]) -> bool:
    if any(k.startswith("lm_head.") and k != HEAD_KEY for k in keys):
        return True  # lm_head.weight_scale, lm_head.weight_packed, ...
    qc = cfg.get("quantization_config")
    return bool(qc) and HEAD_KEY in keys and "lm_head" not in (qc.get("ignore") or [])


def _permute_weights(src: Path, dst: Path, cfg: dict[str, Any], perm: Permutation) -> dict[str, Any]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise UserError(f"{src}: no *.safetensors weights; the LLM folder is incomplete")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                where[k] = f
    if EMBED_KEY not in where:
        raise UserError(f"{src}: no {EMBED_KEY} in the safetensors files; not a Qwen2 checkpoint")
    if _quantized_head(cfg, set(where)):
        raise UserError(f"{src}: lm_head is quantized (quantization_config.ignore lacks lm_head); the Spark "
                        "serving profile needs a checkpoint made with lm_head ignored (the default recipes do)")
    index = torch.tensor(perm.table, dtype=torch.long)  # new row p = old row table[p] (a swap)
    emit = torch.tensor(perm.emit, dtype=torch.long)
    head_file = where[EMBED_KEY]
    summary: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            meta = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        if EMBED_KEY in tensors:
            old = tensors[EMBED_KEY]
            if old.shape[0] != perm.vocab_size:
                raise UserError(f"{src}/config.json: vocab_size {perm.vocab_size} disagrees with the embedding's "
                                f"{old.shape[0]} rows in {f.name}")
            tensors[EMBED_KEY] = old.index_select(0, index).contiguous()
            summary = {"embedding_rows": old.shape[0], "dtype": str(old.dtype).replace("torch.", "")}
        if HEAD_KEY in tensors:  # an untied head: keep its own rows, permuted the same way
            tensors[HEAD_KEY] = tensors[HEAD_KEY].index_select(0, emit).contiguous()
            summary["head_from"] = "lm_head"
        elif f == head_file and HEAD_KEY not in where:  # tied: the head is the embedding
            with safe_open(str(f), "pt") as st:
                tensors[HEAD_KEY] = st.get_tensor(EMBED_KEY).index_select(0, emit).contiguous()
            summary["head_from"] = "embedding"
        save_file(tensors, str(dst / f.name), metadata=meta)
        (dst / f.name).chmod(0o644)  # safetensors creates 0600; the other files get 0644
        del tensors
    idx_name = "model.safetensors.index.json"
    if (src / idx_name).is_file():
        idx = json.loads((src / idx_name).read_text())
        idx["weight_map"].setdefault(HEAD_KEY, where.get(HEAD_KEY, head_file).name)
        (dst / idx_name).write_text(json.dumps(idx, indent=2) + "\n")
    summary["head_rows"] = perm.n
    return summary


# --- tokenizer ----------------------------------------------------------------------
def _permute_tokenizer_json(data: dict[str, Any], perm: Permutation) -> dict[str, Any]:
    """Permute a ``tokenizers`` JSON: BPE vocab ids and added-token ids.

    ``tokenizers`` gives an added token the id its content has in the model vocab,
    else the next free id after the model's, whatever the JSON says; so each added
    token's content is also put into the BPE vocab at its permuted id (no merge
    produces these strings, so BPE results do not change).
    """
    t = perm.table
    model = data["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"tokenizer.json: model type {model.get('type')!r}; the Spark profile expects a BPE tokenizer")
    vocab = {tok: t[i] for tok, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        added["id"] = t[added["id"]]
        vocab[added["content"]] = added["id"]
    if len(set(vocab.values())) != len(vocab):
        raise UserError("tokenizer.json: an added token shares its content with a BPE token at another id; "
                        "cannot permute this tokenizer")
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    data["added_tokens"] = sorted(data.get("added_tokens", []), key=lambda a: a["id"])
    pp = data.get("post_processor") or {}
    for st in (pp.get("special_tokens") or {}).values():  # TemplateProcessing (Qwen uses ByteLevel: none)
        st["ids"] = [t[i] for i in st.get("ids", [])]
    return data


def _permute_tokenizer(src: Path, dst: Path, perm: Permutation) -> None:
    t = perm.table
    tj = src / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"{src}: no tokenizer.json; the Spark profile rewrites token ids in tokenizer.json")
    data = _permute_tokenizer_json(json.loads(tj.read_text(encoding="utf-8")), perm)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(t[int(k)]): v for k, v in sorted(
                cfg["added_tokens_decoder"].items(), key=lambda kv: t[int(kv[0])])}
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    for name in ("vocab.json", "added_tokens.json"):  # slow-tokenizer files: string -> id maps
        if (src / name).is_file():
            m = json.loads((src / name).read_text(encoding="utf-8"))
            (dst / name).write_text(json.dumps({k: t[v] for k, v in m.items()}, ensure_ascii=False),
                                    encoding="utf-8")
    for name in ("merges.txt", "special_tokens_map.json", "chat_template.jinja"):  # strings only
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --- configs ------------------------------------------------------------------------
_ID_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")


def _remap_ids(d: dict[str, Any], perm: Permutation) -> None:
    for key in _ID_FIELDS:
        v = d.get(key)
        if isinstance(v, int):
            d[key] = perm.table[v]
        elif isinstance(v, list):
            d[key] = [perm.table[x] for x in v]


def profile_config(cfg: dict[str, Any], perm: Permutation) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    _remap_ids(out, perm)
    out["architectures"] = [ARCHITECTURE]
    out["tie_word_embeddings"] = False
    out[N_FIELD] = perm.n
    qc = out.get("quantization_config")
    if qc is not None and "lm_head" not in (qc.get("ignore") or []):
        qc["ignore"] = [*(qc.get("ignore") or []), "lm_head"]
    return out


def transform_llm(src: Path, dst: Path) -> dict[str, Any]:
    """Write the profile of the ``LLM/`` folder ``src`` into the empty folder ``dst``; return a summary."""
    from spark_quant.models.folder import read_config

    src, dst = Path(src), Path(dst)
    raw = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    if raw.get(N_FIELD) or (src / PROFILE_MARKER).is_file():
        raise UserError(f"{src}: already a Spark serving profile; give the original model or checkpoint")
    cfg = read_config(src)
    perm = Permutation.spark(cfg["vocab_size"])
    dst.mkdir(parents=True, exist_ok=True)
    summary = _permute_weights(src, dst, cfg, perm)
    _permute_tokenizer(src, dst, perm)
    (dst / "config.json").write_text(json.dumps(profile_config(cfg, perm), indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text())
        _remap_ids(gen, perm)
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (dst / PROFILE_MARKER).write_text(json.dumps(perm.marker()) + "\n")
    return summary | {N_FIELD: perm.n}


# --- the stage ----------------------------------------------------------------------
def derived_profile_dir(source: Path) -> Path:
    """Where eval caches the profile of a model or checkpoint folder: a sibling named ``<name>-spark-profile``."""
    source = Path(source)
    return source.parent / f"{source.name}-spark-profile"


def _source_inputs(source: Path) -> dict[str, Any]:
    from spark_quant.artifacts import read_manifest, sha256_file
    from spark_quant.models.folder import model_fingerprint

    llm = source / "LLM"
    man = read_manifest(source)
    return {
        "profile_version": PROFILE_VERSION,
        "source": model_fingerprint(source),
        "source_manifest_files": man.get("files") if man else None,
        "tokenizer": {p.name: sha256_file(p) for p in sorted(llm.glob("*.json")) if p.name.startswith("tokenizer")},
    }


def build_profile(source: Path, out: Path | None = None, overwrite: bool = False) -> Path:
    """Write the Spark serving profile of a Spark-TTS folder (model or quantized checkpoint) to ``out``.

    Atomic (temporary folder renamed into place, ``manifest.json`` last); a profile
    whose source did not change is kept. ``out`` defaults to ``derived_profile_dir``,
    which is replaced when stale; an explicit ``out`` needs ``overwrite``.
    """
    from spark_quant.artifacts import link_or_copy, write_manifest
    from spark_quant.models.folder import llm_dir
    from spark_quant.outputs import begin_stage, stage_folder

    source = Path(source)
    llm = llm_dir(source)
    derived = out is None
    out = Path(out) if out is not None else derived_profile_dir(source)
    inputs = _source_inputs(source)
    if begin_stage(out, "serving-profile", inputs, overwrite, derived, sources=[source], why="source unchanged"):
        return out
    started = time.time()
    with stage_folder(out, overwrite=overwrite, stage="serving-profile", replace_stale=derived) as tmp:
        for item in sorted(source.iterdir()):
            if item.name in ("LLM", "manifest.json", "PROXY.json") or item.name.startswith("."):
                continue
            link_or_copy(item, tmp / item.name)
        t0 = time.time()
        summary = transform_llm(llm, tmp / "LLM")
        write_manifest(tmp, "serving-profile", {"source": str(source)}, inputs, started,
                       extra={"source_dir": str(source), "profile": summary,
                              "timings": {"transform_s": round(time.time() - t0, 2)}})
    print(f"serving-profile: wrote {out} (head {summary[N_FIELD]} rows, from the {summary.get('head_from')})")
    return out
