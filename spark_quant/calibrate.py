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
from spark_quant.artifacts import (
    check_writable,
    fingerprint,
    is_up_to_date,
    reuse_equivalent,
    sha256_file,
    stage_folder,
    write_manifest,
)
from spark_quant.config import Experiment
from spark_quant.errors import UserError
from spark_quant.model import ensure_model, load_tokenizer, model_fingerprint

SAMPLES = "samples.jsonl"
REFERENCES = "references.jsonl"
LEVELS = list(spark.LEVEL)
GENDERS = list(spark.GENDER)


def read_corpus(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 corpus; one-line errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found; set calibration.corpus to a UTF-8 text file, one sentence a line")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8; re-save the corpus as UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{path}: corpus is empty; it needs at least one sentence")
    return lines


def read_references(path: Path) -> list[dict[str, Any]]:
    """User-supplied BiCodec references: JSONL of {global: [32 ints], semantic: [ints], text: str?}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: calibration.references not found; give a JSONL of BiCodec tokens or set it to null")
    refs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            g, s = r["global"], r.get("semantic", [])
            spark.clone_prompt("x", g, r.get("text") or None, s if r.get("text") else None)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: line {n}: not a BiCodec reference ({e}); expected {{\"global\": [32 ints], "
                            f"\"semantic\": [ints], \"text\": \"...\"}}") from None
        refs.append({"global": list(g), "semantic": list(s), "text": r.get("text") or ""})
    if not refs:
        raise UserError(f"{path}: no references in the file")
    return refs


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
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One decode step is a handful of tiny GEMMs: on a 2-core machine OpenMP's hand-off costs
        # far more than it saves (a 16x256 @ 256x768 linear: 4.3 ms on 2 threads, 0.1 ms on 1).
        torch.set_num_threads(1)
    try:
        return _generate_batches(model, prompts, steps, sem, sem_eos, max_new, min_semantic, gen, batch_size,
                                 desc, sampling, device, head)
    finally:
        torch.set_num_threads(threads)


def _generate_batches(model, prompts, steps, sem, sem_eos, max_new, min_semantic, gen, batch_size, desc, sampling,
                      device, head) -> list[list[int]]:
    import torch
    from tqdm import tqdm

    outs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), spark.PAD_ID, dtype=torch.long, device=device)
        att = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            att[i, width - len(p):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        rows: list[list[int]] = [[] for _ in batch]
        with torch.no_grad():
            out = model.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
            for j in range(max_new):
                h = out.last_hidden_state[:, -1]
                if j < len(steps):
                    lo, hi = steps[j]
                    cand = torch.arange(lo, hi, device=device)
                else:
                    n_sem = j - len(steps)
                    cand = sem_eos if min_semantic is not None and n_sem >= min_semantic else sem
                logits = (h @ head[cand].T).float()
                tok = cand[_sample(logits, gen, **sampling)]
                tok = torch.where(done, torch.full_like(tok, spark.PAD_ID), tok)
                for i, t in enumerate(tok.tolist()):
                    if not done[i]:
                        rows[i].append(t)
                done |= tok == spark.EOS_ID
                if bool(done.all()):
                    break
                att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = model.model(input_ids=tok[:, None], attention_mask=att, position_ids=pos,
                                  past_key_values=out.past_key_values, use_cache=True)
        outs += rows
    return outs


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
    derived = out is None  # the pipeline's own folder: a stale one is replaced, as make expects
    out = Path(out or exp.calibration_dir)
    model_dir, is_proxy = exp.resolved_model()
    corpus = read_corpus(cfg.corpus)
    user_refs = read_references(cfg.references) if cfg.references else None
    llm = ensure_model(model_dir, is_proxy, exp.proxy_size, exp.proxy_seed, exp.proxy_weights)

    inputs = {
        "config": cfg.model_dump(mode="json"),
        "corpus_sha256": sha256_file(cfg.corpus),
        "references_sha256": sha256_file(cfg.references) if cfg.references else None,
        "model": model_fingerprint(model_dir),
    }
    if is_up_to_date(out, "calibrate", fingerprint(inputs)) and not overwrite:
        print(f"calibrate: {out} is up to date (inputs unchanged); skipping")
        return out
    if derived and (src := reuse_equivalent(out, "calibrate", fingerprint(inputs), overwrite, replace_stale=True)):
        print(f"calibrate: {out} reuses {src} (same model and calibration settings)")
        return out

    check_writable(out, overwrite, "calibrate", replace_stale=derived)
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

    for smp in samples:
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
                cfg.seed + 1000, cfg.generation_batch_size, f"continuations/{kind}", sampling,
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
