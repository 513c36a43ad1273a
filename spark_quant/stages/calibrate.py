"""Stage 1: calibration samples from Spark-TTS prompts.

Writes ``samples.jsonl`` (one JSON object a line: kind, text, input_ids,
attention_mask; ready for llm-compressor's ``oneshot``) and ``manifest.json``.
The same config and seed give a byte-identical samples file.

Two prompt kinds, mixed by ``clone_fraction``:
- controllable: text + random gender / pitch / speed labels;
- voice clone: text + a reference's 32 global tokens, and for
  ``transcript_fraction`` of them also the reference transcript and its
  semantic tokens (the model continues the reference).

Clone references come from real BiCodec token files when the user gives
``references`` (JSONL), otherwise from the model's own controllable-mode
generations, decoded under Spark's output grammar (acoustic tokens, exactly
32 global tokens, then semantic tokens) so that even an untrained proxy
yields well-formed references. ``continuation_tokens`` > 0 appends the model's
own continuation to each prompt: the audio tokens it sees while decoding.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.artifacts import sha256_file, write_manifest
from spark_quant.config import Experiment
from spark_quant.models.ensure import ensure_model
from spark_quant.models.folder import load_tokenizer
from spark_quant.models.generate import decode
from spark_quant.outputs import begin_stage, stage_folder
from spark_quant.spark.corpus import REFERENCES, SAMPLES, read_corpus, read_references
from spark_quant.stages.upstream import calibration_inputs

LEVELS = list(spark.LEVEL)
GENDERS = list(spark.GENDER)


# --- grammar-constrained generation (Spark's output format) ----------------------
def grammar_steps(phase: str, open_block: bool) -> list[tuple[int, int]]:
    """Allowed id range [lo, hi) at each step before the free semantic run.

    "controllable": acoustic block, exactly 32 globals, end marker, start of
    the semantic block; "semantic": only the semantic block's opening marker
    (if ``open_block``). After these steps only semantic tokens (and EOS,
    once allowed) may follow.
    """
    rs, rz, tid = spark.RANGE_START, spark.RANGE_SIZE, spark.token_id

    def one(tok: str) -> tuple[int, int]:
        return tid(tok), tid(tok) + 1

    steps: list[tuple[int, int]] = []
    if phase == "controllable":
        steps += [one("<|start_acoustic_token|>"),
                  (rs["pitch_value"], rs["pitch_value"] + rz["pitch_value"]),
                  (rs["speed_value"], rs["speed_value"] + rz["speed_value"]),
                  one("<|end_acoustic_token|>"), one("<|start_global_token|>")]
        steps += [(rs["bicodec_global"], rs["bicodec_global"] + spark.GLOBAL_CODEBOOK)] * spark.N_GLOBAL
        steps += [one("<|end_global_token|>")]
        open_block = True
    if open_block:
        steps += [one("<|start_semantic_token|>")]
    return steps


def _sample(logits, gen, temperature: float, top_k: int, top_p: float):
    """Index sampled from each row of logits with temperature / top-k / top-p (greedy if temperature 0)."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    k = min(top_k, logits.shape[-1]) if top_k and top_k > 0 else logits.shape[-1]
    vals, idx = logits.topk(k, dim=-1)
    probs = vals.softmax(-1)
    if top_p < 1.0:
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs > top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    choice = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return idx.gather(-1, choice[:, None]).squeeze(-1)


def generate_constrained(
    model, prompts: list[list[int]], phase: str, max_new: int, min_semantic: int | None, open_block: bool,
    seed: int, batch_size: int, desc: str, sampling: dict[str, Any],
) -> list[list[int]]:
    """Sample continuations that follow Spark's output grammar, batched and seeded.

    The model's own distribution, renormalised over the ids the grammar allows
    at each step (the same as masking every other logit). Only the allowed rows
    of the tied output head are multiplied, so a step costs a fraction of a
    full 166,000-way head. EOS becomes allowed after ``min_semantic`` semantic
    tokens (never if None).
    """
    import torch

    device = next(model.parameters()).device
    head = model.get_output_embeddings().weight
    steps = grammar_steps(phase, open_block)
    s0 = spark.RANGE_START["bicodec_semantic"]
    sem = torch.arange(s0, s0 + spark.SEMANTIC_CODEBOOK, device=device)
    sem_eos = torch.cat([sem, torch.tensor([spark.EOS_ID], device=device)])
    gen = torch.Generator(device=device).manual_seed(seed)

    def choose(h, j):
        if j < len(steps):
            cand = torch.arange(*steps[j], device=device)
        else:
            cand = sem_eos if min_semantic is not None and j - len(steps) >= min_semantic else sem
        return cand[_sample((h @ head[cand].T).float(), gen, **sampling)], None

    return decode(model, prompts, max_new, choose, batch_size, desc)[0]


def _len_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {
        "count": len(s),
        "min": s[0],
        "median": statistics.median(s),
        "mean": round(statistics.fmean(s), 1),
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
        "total": sum(s),
    }


def calibrate(exp: Experiment, out: Path | None = None, overwrite: bool = False) -> Path:
    cfg = exp.calibration
    out, derived = exp.folder(out, exp.calibration_dir)
    model_dir, is_proxy = exp.resolved_model()
    corpus = read_corpus(cfg.corpus)
    user_refs = read_references(cfg.references) if cfg.references else None
    llm = ensure_model(model_dir, is_proxy, exp.proxy_size, exp.proxy_seed, exp.proxy_weights)

    inputs = calibration_inputs(exp, model_dir)
    if begin_stage(out, "calibrate", inputs, overwrite, derived, sources=[model_dir, cfg.corpus, cfg.references],
                   reuse=True):
        return out
    started = time.time()
    tok = load_tokenizer(llm)
    rng = random.Random(cfg.seed)
    n_clone = round(cfg.num_samples * cfg.clone_fraction)
    n_ctrl = cfg.num_samples - n_clone

    needs_model = (n_clone and user_refs is None) or cfg.continuation_tokens > 0
    model = None
    if needs_model:
        model = _load_model(llm)
    sampling = {"temperature": exp.eval.temperature, "top_k": exp.eval.top_k, "top_p": exp.eval.top_p}

    # references for clone prompts
    ref_source = "none"
    refs: list[dict[str, Any]] = []
    if n_clone:
        if user_refs is not None:
            refs, ref_source = user_refs, f"file:{cfg.references}"
        else:
            ref_texts = [rng.choice(corpus) for _ in range(cfg.num_references)]
            ref_prompts = [
                tok.encode(spark.controllable_prompt(t, rng.choice(GENDERS), rng.choice(LEVELS), rng.choice(LEVELS)))
                for t in ref_texts
            ]
            gens = generate_constrained(
                model, ref_prompts, "controllable", 39 + cfg.reference_semantic_tokens, None, True,
                cfg.seed, cfg.generation_batch_size, "references", sampling,
            )
            for t, g in zip(ref_texts, gens):
                parsed = spark.parse_ids(g + [spark.EOS_ID], "controllable")
                refs.append({"global": parsed.global_tokens, "semantic": parsed.semantic_tokens, "text": t})
            ref_source = "model:controllable-generations (grammar-constrained sampling)"

    samples: list[dict[str, Any]] = []
    for _ in range(n_ctrl):
        text = rng.choice(corpus)
        g, p, s = rng.choice(GENDERS), rng.choice(LEVELS), rng.choice(LEVELS)
        samples.append({"kind": "controllable", "text": text, "labels": [g, p, s],
                        "prompt": spark.controllable_prompt(text, g, p, s)})
    for _ in range(n_clone):
        text = rng.choice(corpus)
        ref = refs[rng.randrange(len(refs))]
        with_transcript = bool(ref["text"] and ref["semantic"]) and rng.random() < cfg.transcript_fraction
        prompt = (
            spark.clone_prompt(text, ref["global"], ref["text"], ref["semantic"])
            if with_transcript
            else spark.clone_prompt(text, ref["global"])
        )
        samples.append({"kind": "clone_transcript" if with_transcript else "clone", "text": text, "prompt": prompt})
    rng.shuffle(samples)

    from tqdm import tqdm

    for smp in tqdm(samples, desc="tokenizing samples", unit="sample", leave=False, disable=len(samples) < 1000):
        smp["input_ids"] = tok.encode(smp.pop("prompt"))
        smp["prompt_tokens"] = len(smp["input_ids"])
    if cfg.continuation_tokens:
        for kind, phase, open_block in (
            ("controllable", "controllable", True),
            ("clone", "semantic", True),
            ("clone_transcript", "semantic", False),
        ):
            group = [s for s in samples if s["kind"] == kind]
            if not group:
                continue
            conts = generate_constrained(
                model, [s["input_ids"] for s in group], phase, cfg.continuation_tokens, 1, open_block,
                (cfg.seed + 1000) % 2**63, cfg.generation_batch_size, f"continuations/{kind}", sampling,
            )
            for s, c in zip(group, conts):
                s["input_ids"] = s["input_ids"] + c
    truncated = 0
    for s in samples:
        if len(s["input_ids"]) > cfg.max_seq_length:
            s["input_ids"] = s["input_ids"][: cfg.max_seq_length]
            truncated += 1
        s["attention_mask"] = [1] * len(s["input_ids"])

    with stage_folder(out, overwrite=overwrite, stage="calibrate", replace_stale=derived) as tmp:
        with open(tmp / SAMPLES, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False, separators=(",", ":")) + "\n")
        if refs:
            with open(tmp / REFERENCES, "w", encoding="utf-8") as f:
                for r in refs:
                    f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")
        kinds = sorted({s["kind"] for s in samples})
        write_manifest(
            tmp, "calibrate", exp.model_dump(mode="json"), inputs, started,
            extra={
                "model_dir": str(model_dir),
                "model_is_proxy": is_proxy,
                "counts": {k: sum(1 for s in samples if s["kind"] == k) for k in kinds},
                "references": {"source": ref_source, "count": len(refs)},
                "tokens": {
                    "all": _len_stats([len(s["input_ids"]) for s in samples]),
                    "prompt": _len_stats([s["prompt_tokens"] for s in samples]),
                    **{k: _len_stats([len(s["input_ids"]) for s in samples if s["kind"] == k]) for k in kinds},
                },
                "truncated_to_max_seq_length": truncated,
                "samples_sha256": sha256_file(tmp / SAMPLES),
            },
        )
    print(f"calibrate: wrote {len(samples)} samples to {out / SAMPLES}")
    return out


def _load_model(llm: Path):
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.bfloat16 if cuda else torch.float32)
    return model.to("cuda" if cuda else "cpu").eval()
