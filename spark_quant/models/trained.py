"""A trained Spark proxy: the tiny Qwen2 proxy taught a synthetic Spark "language".

Random weights give near-uniform next-token distributions, so quantization
similarity measured on them means little. This module trains the proxy (same
shape, tokenizer and layout as ``proxy.build_proxy``) on synthetic sequences in
Spark-TTS's exact prompt and output grammar, in which the audio tokens are a
learnable function of the prompt. The result has peaked, structured outputs.

The synthetic language is ``spark_language.py``.

What the audio tokens depend on is deliberately simple: labels (pitch/speed values,
globals, K), the reference's semantic tokens, and the text's length. The countdown codes'
embedding rows start from ``spark_language.number_features`` (mixed into the seeded init,
``TrainSettings.number_init``): with independent random rows, 400 CPU steps do not learn to
write the count (correlation with the expected count 0.39 in language version 1, 0.72 in
version 2 without it, 0.97 with it; docs/benchmarks.md). A
per-token text-to-semantic map (one code per BPE id) would need each of ~4,000 BPE ids
seen many times, which a few CPU minutes cannot give, and it could not generalize to
held-out texts (27% of their tokens never occur in train.txt).

Training texts are ``calibration/texts/train.txt`` and variations of them (random
token spans, pairs of sentences). ``calibration/texts/heldout.txt`` is never trained
on: the accuracy recorded in ``PROXY.json`` is measured on synthetic sequences built
from held-out texts (their content tokens partly never seen in training, so the
identity of their semantic tokens cannot be learned; the grammar, counts and EOS can).

Training touches only the rows of the tied embedding that the language uses (the
train texts' tokens, Spark's 13,494 emittable ids and the prompt specials): the
model is trained with that compact vocabulary, with a softmax over it (every
emittable id is in it, so Spark's whole output space competes), and its rows are
written back into the full 166,000-row embedding; other rows keep the seeded random
init. Outputs are then checked under full-vocabulary decoding (``measure``).
Deterministic for a seed on a given torch build (CPU, fixed thread count).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.errors import UserError
from spark_quant.models.determinism import deterministic_kernels
from spark_quant.models.generate import greedy_generate
from spark_quant.models.sensitivity import rtn_sensitivity
from spark_quant.models.spark_language import (
    K_BY_SPEED,
    LANGUAGE_SEED,
    LANGUAGE_VERSION,
    VARIANT_OFFSET,
    Corpus,
    Language,
    evaluation_sequences,
    number_features,
    output_for,
    training_batch,
)
from spark_quant.outputs import atomic_folder, remove_dead_temporaries
from spark_quant.spark.heldout import heldout_prompts

MARKER = "PROXY.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400
    batch_size: int = 8
    lr: float = 5e-3
    warmup: int = 20
    weight_decay: float = 0.0
    threads: int = 1  # measured on the 2-core CI machine: 1 thread beats 2 for these small GEMMs
    n_negatives: int = 2048  # never-emitted ids kept in the training softmax, so generic rows get pushed down
    n_sampled: int = 2048  # random rows of the compact vocabulary in each step's softmax, besides the targets
    truncate_fraction: float = 0.6  # share of sequences cut a few tokens into the semantic block (see training_batch)
    number_init: float = 0.5  # length of the number-shaped part of the countdown codes' initial rows (0: none)
    semantic_variants: int = 1  # spark_language.Language(variants): 1 is the deterministic language
    voiced_variants: bool = False  # spark_language.Language(voiced): the variants' weights depend on the voice
    deterministic_gpu: bool = False  # on a GPU, PyTorch's deterministic kernels (cuBLAS, index_put, attention)

    @classmethod
    def for_size(cls, size: str) -> TrainSettings:
        # full (the 0.5B shape) is for a GPU: bf16 autocast; steps sized for <= 5 minutes on one H200 (not yet
        # measured there: 159 s, docs/benchmarks.md); SPARK_QUANT_TRAIN_STEPS overrides them for a measurement.
        # It learns the deterministic language exactly (loss 1e-5, one-hot outputs, which no quantization can
        # move), so it learns the language with 8 semantic variants (1.82 nats at each semantic position)
        if size == "tiny":
            return cls()
        steps = int(os.environ.get("SPARK_QUANT_TRAIN_STEPS", "1500"))
        # deterministic_gpu: seven H100 builds gave four different weights (same loss to 4 decimals): atomic adds in
        # the embedding and attention backward passes; "reproducible from a seed" asks for one
        return cls(steps=steps, batch_size=32, lr=1e-3, warmup=50, threads=os.cpu_count() or 2, semantic_variants=8,
                   deterministic_gpu=True)


# --- training ----------------------------------------------------------------------
def _active_ids(corpus: Corpus, n_negatives: int, seed: int) -> list[int]:
    used = {t for seq in corpus.train for t in seq}
    used |= set(spark.emittable_ids()) | set(range(spark.QWEN_SPECIAL_START, spark.QWEN_SPECIAL_START + 22))
    rest = sorted(set(range(spark.VOCAB_SIZE)) - used)
    used |= set(random.Random(seed + 1).sample(rest, n_negatives))
    return sorted(used)


def train(model, corpus: Corpus, lang: Language, settings: TrainSettings, seed: int, log=print) -> dict[str, Any]:
    """Train ``model`` (full-vocab Qwen2ForCausalLM, FP32) in place; return training stats."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    device = next(model.parameters()).device  # a GPU trains in bf16 autocast (weights and optimizer stay FP32)
    with deterministic_kernels(settings.deterministic_gpu and device.type == "cuda") as nondeterministic:
        stats = _train(model, corpus, lang, settings, seed, device, threads, log)
    return stats | ({"nondeterministic_ops": nondeterministic} if settings.deterministic_gpu else {})


def _train(model, corpus: Corpus, lang: Language, settings: TrainSettings, seed: int, device, threads: int,
           log) -> dict[str, Any]:
    import torch

    try:
        active = _active_ids(corpus, settings.n_negatives, seed)
        remap = torch.full((spark.VOCAB_SIZE,), -1, dtype=torch.long)
        remap[torch.tensor(active)] = torch.arange(len(active))
        remap = remap.to(device)
        full_emb = model.get_input_embeddings()
        if settings.number_init:  # the countdown codes start number-shaped (spark_language.number_features),
            # every variant of a code from the same row (each keeps its own random part)
            rows = number_features(full_emb.weight.shape[1], settings.number_init)
            ids = torch.tensor([spark.semantic_id(c + VARIANT_OFFSET * j) for j in range(lang.variants) for c in rows],
                               device=device)
            with torch.no_grad():
                full_emb.weight[ids] = (torch.tensor(list(rows.values()), device=device).repeat(lang.variants, 1)
                                        + 0.5 * full_emb.weight[ids])
        emb = torch.nn.Embedding(len(active), full_emb.weight.shape[1]).to(device)
        with torch.no_grad():
            emb.weight.copy_(full_emb.weight[torch.tensor(active, device=device)])
        body = model.model
        body.embed_tokens = emb
        params = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
        params = list({id(p): p for p in params}.values())
        opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
        rng = random.Random(seed)
        model.train()
        started, cpu_started = time.perf_counter(), time.process_time()
        losses = []
        for step in range(settings.steps):
            lr = settings.lr * min(1.0, (step + 1) / settings.warmup) * 0.5 * (
                1 + math.cos(math.pi * step / settings.steps))
            for gp in opt.param_groups:
                gp["lr"] = lr
            batch = training_batch(lang, corpus, rng, settings.batch_size, settings.truncate_fraction)
            width = max(len(s) for s, _ in batch)
            ids = torch.full((len(batch), width), spark.PAD_ID, dtype=torch.long)
            tgt = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, (s, plen) in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                tgt[i, plen - 1 : len(s) - 1] = torch.tensor(s[plen:])
            ids, tgt = ids.to(device), tgt.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h = body(input_ids=remap[ids]).last_hidden_state
                mask = tgt != -100
                # sampled softmax: the batch's targets plus random rows of the compact vocabulary
                targets = remap[tgt[mask]]
                sampled = torch.randint(len(active), (settings.n_sampled,)).to(device)
                cand = torch.unique(torch.cat([targets, sampled]))
                pos_in_cand = torch.searchsorted(cand, targets)
                logits = h[mask] @ emb.weight[cand].T
            loss = torch.nn.functional.cross_entropy(logits.float(), pos_in_cand)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == settings.steps - 1:
                log(f"train: step {step}/{settings.steps} loss {statistics.fmean(losses[-50:]):.4f} "
                    f"({time.perf_counter() - started:.0f}s)")
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        with torch.no_grad():
            full_emb.weight[torch.tensor(active, device=device)] = emb.weight
        body.embed_tokens = full_emb
        model.tie_weights()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "final_loss": round(statistics.fmean(losses[-20:]), 5),
            "first_loss": round(losses[0], 4), "active_rows": len(active), "device": str(device)}


# --- measurement ---------------------------------------------------------------------
def measure(model, tok, texts: list[str], n: int = 16, max_new: int = 400,
            lang: Language | None = None) -> dict[str, Any]:
    """How peaked and structured the model's full-vocabulary greedy outputs are on held-out prompts (the
    greedy output of a language with variants is its mode, variant 0 everywhere: ``output_for``)."""
    lang = lang or Language()
    prompts = heldout_prompts(texts, n, tok.encode,
                              clone_globals=lambda i, rng: lang.voice_globals[(rng.randrange(2), rng.randrange(5))])
    outs, maxp = greedy_generate(model, [p["ids"] for p in prompts], max_new)
    valid, glob32, eos, exact, tok_acc, count_err = [], [], [], [], [], []
    rows = []
    for pr, o in zip(prompts, outs):
        parsed = spark.parse_ids(o, pr["mode"])
        want = output_for(lang, pr["ids"])
        valid.append(parsed.valid)
        eos.append(parsed.finished)
        if pr["mode"] == "controllable":
            glob32.append(len(parsed.global_tokens) == spark.N_GLOBAL)
        exact.append(o == want)
        tok_acc.append(sum(a == b for a, b in zip(o, want)) / len(want))
        want_sem = spark.parse_ids(want, pr["mode"]).semantic_tokens
        count_err.append(abs(len(parsed.semantic_tokens) - len(want_sem)) / len(want_sem))
        ids = pr["ids"]
        n_content = ids.index(spark.token_id("<|end_content|>")) - ids.index(spark.token_id("<|start_content|>")) - 1
        rows.append({"mode": pr["mode"], "speed": pr["speed"], "content_tokens": n_content,
                     "semantic": len(parsed.semantic_tokens), "expected_semantic": len(want_sem)})
    ctrl = [r for r in rows if r["mode"] == "controllable"]
    allp = [x for ps in maxp for x in ps]
    return {
        "prompts": len(prompts),
        "valid_rate": statistics.fmean(valid),
        "eos_rate": statistics.fmean(eos),
        "controllable_32_globals_rate": statistics.fmean(glob32),
        "exact_match_rate": statistics.fmean(exact),
        "token_accuracy": statistics.fmean(tok_acc),
        "semantic_count_rel_error_mean": statistics.fmean(count_err),
        **_corr([r["semantic"] for r in rows], [r["expected_semantic"] for r in rows]),
        "semantic_count_by_speed": {s: statistics.fmean(r["semantic"] / max(1, r["expected_semantic"]
                                                                             / K_BY_SPEED[s]) for r in ctrl
                                                        if r["speed"] == s)
                                    for s in range(5) if any(r["speed"] == s for r in ctrl)},
        "mean_max_prob": statistics.fmean(allp),
        "rows": rows,
    }


def _corr(xs: list[float], ys: list[float]) -> dict[str, Any]:
    """Pearson correlation of the semantic counts with the expected ones, with its 95% interval (Fisher z)."""
    if len(xs) < 4 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"semantic_count_corr_expected": None, "semantic_count_corr_ci95": None}
    from scipy import stats

    r = stats.pearsonr(xs, ys)
    ci = r.confidence_interval(0.95)
    return {"semantic_count_corr_expected": float(r.statistic),
            "semantic_count_corr_ci95": [round(float(ci.low), 4), round(float(ci.high), 4)]}


def teacher_forced_accuracy(model, tok, texts: list[str], n: int = 64, seed: int = 99,
                            lang: Language | None = None) -> dict[str, float]:
    """Next-token accuracy and loss over the output positions of synthetic sequences built from ``texts``,
    with what a model that knew the language exactly would score (``optimal``, ``loss_floor``): the semantic
    positions of a language with variants are draws, so the mode is right with probability ``weights[0]`` and
    the loss there is at least ``semantic_entropy_nats``; every other output position is determined."""
    import torch

    lang = lang or Language()
    seqs = evaluation_sequences(lang, tok, texts, n, seed)
    correct = total = semantic = 0
    nll = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            for s, plen in seqs:
                dev = next(model.parameters()).device
                logits = model(input_ids=torch.tensor([s], device=dev)).logits[0, plen - 1 : len(s) - 1].float()
                tgt = torch.tensor(s[plen:], device=dev)
                correct += int((logits.argmax(-1) == tgt).sum())
                total += len(tgt)
                semantic += sum(spark.is_semantic_id(t) for t in s[plen:])
                nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    return {"accuracy": correct / total, "loss": nll / total, "positions": total,
            **lang.optimal_scores(total, semantic)}



# --- building the model folder -----------------------------------------------------------
def is_trained_proxy(out: Path, size: str, seed: int, settings: TrainSettings | None = None) -> bool:
    """Whether ``out`` holds a finished trained proxy of this size, seed, language version and training
    settings (a change to either rebuilds it; ``threads`` only changes speed)."""
    from spark_quant.models.proxy import read_marker

    m = read_marker(out)
    want = {k: v for k, v in asdict(settings or TrainSettings.for_size(size)).items() if k != "threads"}
    legacy = {"semantic_variants": 1, "voiced_variants": False,  # what a marker from before a field was built with
              "deterministic_gpu": False}
    got = {k: (m.get("training") or {}).get(k, legacy.get(k)) for k in want} if m else {}
    return bool(m) and m.get("kind") == "trained" and m.get("size") == size and m.get("seed") == seed \
        and m.get("language_version") == LANGUAGE_VERSION and got == want


def build_trained_proxy(out: Path, size: str = "tiny", seed: int = 0, settings: TrainSettings | None = None,
                        corpus_path: Path = Path("calibration/texts/train.txt"),
                        heldout_path: Path = Path("calibration/texts/heldout.txt"), log=None) -> Path:
    """Train a proxy and write it at ``out`` in the Spark-TTS layout (cached, atomic, like ``build_proxy``)."""
    from spark_quant.models.proxy import built_facts, check_size, config_yaml, read_marker, write_weights

    check_size(size)
    out = Path(out)
    remove_dead_temporaries(out)
    settings = settings or TrainSettings.for_size(size)
    if is_trained_proxy(out, size, seed, settings):
        return out
    if out.exists() and read_marker(out) is None:
        raise UserError(f"{out}: exists and is not a spark-quant proxy ({MARKER} missing); refusing to replace "
                        "it: choose another folder")
    log = log or (lambda msg: print(msg, flush=True))

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from spark_quant.models.folder import load_tokenizer
    from spark_quant.models.tokenizer import build_spark_tokenizer
    from spark_quant.spark.corpus import read_corpus

    with atomic_folder(out, MARKER, lambda o: is_trained_proxy(o, size, seed, settings)) as tmp:
        started = time.perf_counter()
        llm = tmp / "LLM"
        llm.mkdir(parents=True)
        write_weights(llm, size, seed)  # the random proxy's init: training starts from it
        build_spark_tokenizer(llm)
        tok = load_tokenizer(llm)
        train_texts, heldout_texts = read_corpus(corpus_path), read_corpus(heldout_path)
        overlap = set(train_texts) & set(heldout_texts)
        if overlap:
            raise ValueError(f"{heldout_path}: {len(overlap)} held-out line(s) are also training texts")
        model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
        if size != "tiny" and torch.cuda.is_available():  # the tiny proxy trains on the CPU, as in CI
            model.to("cuda")
        lang = Language(settings.semantic_variants, settings.voiced_variants)
        corpus = Corpus(tok, train_texts, heldout_texts)
        stats = train(model, corpus, lang, settings, seed, log=log)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(llm / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(llm / "model.safetensors", (llm / "config.json").stat().st_mode & 0o777)
        held = teacher_forced_accuracy(model, tok, heldout_texts, lang=lang)
        train_acc = teacher_forced_accuracy(model, tok, train_texts[:64], lang=lang)
        structure = measure(model, tok, heldout_texts, n=16, max_new=300, lang=lang)
        structure.pop("rows")
        sensitivity = rtn_sensitivity(model, tok, heldout_texts, lang)
        (tmp / "config.yaml").write_text(config_yaml(size).replace(
            "random-initialized stand-in", "synthetically trained stand-in").replace(
            "LLM/ has random weights", "LLM/ is trained on a synthetic Spark language"))
        marker = {
            "proxy": "spark-quant",
            "kind": "trained",
            "note": "stand-in for Spark-TTS-0.5B's LLM trained on a synthetic Spark-format language "
                    "(spark_quant/models/trained.py); not the real model, outputs are not speech",
            "size": size,
            "seed": seed,
            "random_init": False,
            "language_version": LANGUAGE_VERSION,
            "language_seed": LANGUAGE_SEED,
            "semantic_variants": lang.variants,
            "voiced_variants": lang.voiced,
            "semantic_entropy_nats": round(lang.semantic_entropy_nats, 4),
            "training": asdict(settings) | stats,
            "final_loss": stats["final_loss"],
            "heldout_accuracy": round(held["accuracy"], 4),
            "heldout_loss": round(held["loss"], 4),
            "heldout_positions": held["positions"],
            "heldout_accuracy_optimal": round(held["optimal"], 4),
            "heldout_loss_floor": round(held["loss_floor"], 4),
            "train_accuracy": round(train_acc["accuracy"], 4),
            "heldout_greedy": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in structure.items()},
            "rtn4_sensitivity": sensitivity,  # KL to a 4-bit round-to-nearest copy: can the fidelity gates fail?
            "corpus": str(corpus_path),
            "heldout": str(heldout_path),
            "parameters": sum(p.numel() for p in model.parameters()),
            **built_facts(size, llm, started),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out
