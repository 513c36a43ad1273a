"""A trained Spark proxy: the tiny Qwen2 proxy taught a synthetic Spark "language".

Random weights give near-uniform next-token distributions, so quantization
similarity measured on them means little. This module trains the proxy (same
shape, tokenizer and layout as ``proxy.build_proxy``) on synthetic sequences in
Spark-TTS's exact prompt and output grammar, in which the audio tokens are a
learnable function of the prompt. The result has peaked, structured outputs.

The synthetic language (``LANGUAGE_VERSION``; its tables come from a fixed seed,
independent of the training seed):

- controllable prompt (``spark.controllable_prompt``: text, gender, pitch, speed) ->
  ``<|start_acoustic_token|><|pitch_value_N|><|speed_value_M|><|end_acoustic_token|>``
  ``<|start_global_token|>`` + 32 globals + ``<|end_global_token|>``
  ``<|start_semantic_token|>`` + semantic tokens + ``<|im_end|>`` (the grammar
  ``calibrate.grammar_steps`` constrains and ``spark.parse_ids`` parses), where
  N = 100 + 200 * pitch + 50 * gender, M = 2 * speed, and the 32 globals are the
  voice (gender, pitch)'s fixed table (10 voices, 320 distinct global ids);
- semantic tokens: K per content token, K = 3, 2, 2, 1, 1 for speed very_low ..
  very_high, so the count is (content tokens) x K and follows text length and speed.
  They count down over the content: code ``4 * (128 * voice + b) + r`` for b = n-1 .. 0
  and r = 0 .. K-1, then ``<|im_end|>``. The first code carries the number of content
  tokens (the model must count the text), the rest is a chain the voice and speed fix;
- voice clone (``spark.clone_prompt`` without transcript) -> ``<|start_semantic_token|>``
  + the countdown at K = 2 in the reference's voice (the voice whose table the 32
  reference globals are; any other reference gets an 11th range) + ``<|im_end|>``;
- voice clone with transcript: the content is transcript + text, the prompt ends with
  the reference's part of the countdown, and the model continues it to ``<|im_end|>``.

What the audio tokens depend on is deliberately simple: labels (pitch/speed values,
globals, K), the reference's globals and semantic tokens, and the text's length. A
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
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.artifacts import swap_into_place

LANGUAGE_VERSION = 1
LANGUAGE_SEED = 20261127  # fixes the synthetic language's tables; not the training seed
K_BY_SPEED = (3, 2, 2, 1, 1)  # semantic tokens per content token, speed very_low .. very_high
CLONE_K = 2
MAX_BLOCKS = 128  # content tokens counted; longer content is cut to this many in the output
OTHER_VOICE = 10  # clone references that are not one of the 10 voice tables
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

    @classmethod
    def for_size(cls, size: str) -> TrainSettings:
        return cls() if size == "tiny" else cls(steps=3000, batch_size=32, lr=1e-3, threads=os.cpu_count() or 2)


# --- the synthetic language ----------------------------------------------------------
def _tid(tok: str) -> int:
    return spark.token_id(tok)


class Language:
    """The tables of the synthetic Spark language (fixed by LANGUAGE_SEED)."""

    def __init__(self) -> None:
        rng = random.Random(LANGUAGE_SEED)
        ids = rng.sample(range(spark.GLOBAL_CODEBOOK), 10 * spark.N_GLOBAL)
        self.voice_globals = {(g, p): ids[(g * 5 + p) * 32 : (g * 5 + p + 1) * 32] for g in range(2) for p in range(5)}
        self._voice_of_global = {glob[0]: g * 5 + p for (g, p), glob in self.voice_globals.items()}

    def voice_of(self, global_tokens: list[int]) -> int:
        """Voice 0..9 of a voice table's globals; OTHER_VOICE for any other reference."""
        v = self._voice_of_global.get(global_tokens[0])
        return v if v is not None and self.voice_globals[divmod(v, 5)] == list(global_tokens) else OTHER_VOICE

    @staticmethod
    def semantic(n_content: int, k: int, voice: int) -> list[int]:
        """Semantic codes (0..8191): a countdown over the content tokens, K codes each, in the voice's range."""
        n = min(n_content, MAX_BLOCKS)
        return [4 * (voice * MAX_BLOCKS + b) + r for b in range(n - 1, -1, -1) for r in range(k)]

    @staticmethod
    def pitch_value(gender: int, pitch: int) -> int:
        return 100 + 200 * pitch + 50 * gender

    @staticmethod
    def speed_value(speed: int) -> int:
        return 2 * speed

    def controllable_output(self, content: list[int], gender: int, pitch: int, speed: int) -> list[int]:
        return (
            [_tid("<|start_acoustic_token|>"), spark.RANGE_START["pitch_value"] + self.pitch_value(gender, pitch),
             spark.RANGE_START["speed_value"] + self.speed_value(speed), _tid("<|end_acoustic_token|>"),
             _tid("<|start_global_token|>")]
            + [spark.global_id(x) for x in self.voice_globals[(gender, pitch)]]
            + [_tid("<|end_global_token|>"), _tid("<|start_semantic_token|>")]
            + [spark.semantic_id(s) for s in self.semantic(len(content), K_BY_SPEED[speed], gender * 5 + pitch)]
            + [spark.EOS_ID]
        )


def _ctrl_prefix(gender: int, pitch: int, speed: int) -> tuple[list[int], list[int]]:
    head = [_tid("<|task_controllable_tts|>"), _tid("<|start_content|>")]
    tail = [_tid("<|end_content|>"), _tid("<|start_style_label|>"), spark.RANGE_START["gender"] + gender,
            spark.RANGE_START["pitch_label"] + pitch, spark.RANGE_START["speed_label"] + speed,
            _tid("<|end_style_label|>")]
    return head, tail


def example(lang: Language, content: list[int], rng: random.Random, kind: str,
            transcript: list[int] | None = None) -> tuple[list[int], int]:
    """(prompt + output ids, prompt length) of one synthetic sequence, ids as the tokenizer gives them."""
    if kind == "controllable":
        g, p, s = rng.randrange(2), rng.randrange(5), rng.randrange(5)
        head, tail = _ctrl_prefix(g, p, s)
        prompt = head + content + tail
        return prompt + lang.controllable_output(content, g, p, s), len(prompt)
    if rng.random() < 0.75:
        glob = lang.voice_globals[(rng.randrange(2), rng.randrange(5))]
    else:
        glob = [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(spark.N_GLOBAL)]
    ref = transcript or []
    prompt = ([_tid("<|task_tts|>"), _tid("<|start_content|>")] + ref + content
              + [_tid("<|end_content|>"), _tid("<|start_global_token|>")]
              + [spark.global_id(x) for x in glob] + [_tid("<|end_global_token|>")])
    sem = [spark.semantic_id(x) for x in lang.semantic(len(ref) + len(content), CLONE_K, lang.voice_of(glob))]
    if not ref:
        return prompt + [_tid("<|start_semantic_token|>")] + sem + [spark.EOS_ID], len(prompt)
    # with the transcript, the prompt ends inside the semantic block with the reference's own tokens
    cut = min(len(ref) * CLONE_K, len(sem) - 1)
    prompt += [_tid("<|start_semantic_token|>")] + sem[:cut]
    return prompt + sem[cut:] + [spark.EOS_ID], len(prompt)


def output_for(lang: Language, prompt_ids: list[int]) -> list[int]:
    """The language's expected continuation of a prompt without reference transcript (Spark tokenizer ids)."""
    sc, ec = _tid("<|start_content|>"), _tid("<|end_content|>")
    content = prompt_ids[prompt_ids.index(sc) + 1 : prompt_ids.index(ec)]
    if prompt_ids[0] == _tid("<|task_controllable_tts|>"):
        g = prompt_ids[-4] - spark.RANGE_START["gender"]
        p = prompt_ids[-3] - spark.RANGE_START["pitch_label"]
        s = prompt_ids[-2] - spark.RANGE_START["speed_label"]
        return lang.controllable_output(content, g, p, s)
    g0 = prompt_ids.index(_tid("<|start_global_token|>")) + 1
    glob = [t - spark.RANGE_START["bicodec_global"] for t in prompt_ids[g0 : g0 + spark.N_GLOBAL]]
    sem = lang.semantic(len(content), CLONE_K, lang.voice_of(glob))
    return [_tid("<|start_semantic_token|>")] + [spark.semantic_id(x) for x in sem] + [spark.EOS_ID]


class Corpus:
    """Encoded training texts and their variations; held-out texts for measurement only."""

    def __init__(self, tok, train_texts: list[str], heldout_texts: list[str]) -> None:
        self.train = [tok.encode(t) for t in train_texts]
        self.heldout = [tok.encode(t) for t in heldout_texts]

    def sample(self, rng: random.Random) -> list[int]:
        x = rng.random()
        t = rng.choice(self.train)
        if x < 0.6 or len(t) < 6:
            return list(t)
        if x < 0.85:  # a random span
            n = rng.randint(3, len(t) - 1)
            i = rng.randrange(len(t) - n + 1)
            return t[i : i + n]
        return (t + rng.choice(self.train))[:64]  # two sentences


def training_batch(lang: Language, corpus: Corpus, rng: random.Random, n: int,
                   truncate_fraction: float = 0.0) -> list[tuple[list[int], int]]:
    """n synthetic sequences; ``truncate_fraction`` of them end 4 tokens into the semantic block.

    The first semantic code is the one place where the text's length must be counted;
    the rest of the block is a chain. Cut sequences give that signal at about half the
    compute of a whole one.
    """
    out = []
    ss = _tid("<|start_semantic_token|>")
    for _ in range(n):
        kind = rng.choices(["controllable", "clone", "clone_transcript"], [0.5, 0.35, 0.15])[0]
        content = corpus.sample(rng)
        if kind == "clone_transcript":
            ref = corpus.sample(rng)[:24]
            seq, plen = example(lang, content, rng, "clone", transcript=ref)
        else:
            seq, plen = example(lang, content, rng, kind)
            if rng.random() < truncate_fraction:
                seq = seq[: seq.index(ss, plen - 1) + 5]
        out.append((seq, plen))
    return out


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
    try:
        active = _active_ids(corpus, settings.n_negatives, seed)
        remap = torch.full((spark.VOCAB_SIZE,), -1, dtype=torch.long)
        remap[torch.tensor(active)] = torch.arange(len(active))
        full_emb = model.get_input_embeddings()
        emb = torch.nn.Embedding(len(active), full_emb.weight.shape[1])
        with torch.no_grad():
            emb.weight.copy_(full_emb.weight[torch.tensor(active)])
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
            h = body(input_ids=remap[ids]).last_hidden_state
            mask = tgt != -100
            # sampled softmax: the batch's targets plus random rows of the compact vocabulary
            targets = remap[tgt[mask]]
            cand = torch.unique(torch.cat([targets, torch.randint(len(active), (settings.n_sampled,))]))
            pos_in_cand = torch.searchsorted(cand, targets)
            logits = h[mask] @ emb.weight[cand].T
            loss = torch.nn.functional.cross_entropy(logits, pos_in_cand)
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
            full_emb.weight[torch.tensor(active)] = emb.weight
        body.embed_tokens = full_emb
        model.tie_weights()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "final_loss": round(statistics.fmean(losses[-20:]), 5),
            "first_loss": round(losses[0], 4), "active_rows": len(active)}


# --- measurement ---------------------------------------------------------------------
def greedy_generate(model, prompts: list[list[int]], max_new: int, batch_size: int = 16) -> tuple[list[list[int]], list[list[float]]]:
    """Full-vocabulary greedy decoding (transformers); (tokens, max probability per step), stopping at EOS."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outs, maxp = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), spark.PAD_ID, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, width - len(p):] = torch.tensor(p)
                att[i, width - len(p):] = 1
            pos = (att.cumsum(-1) - 1).clamp(min=0)
            rows = [[] for _ in batch]
            probs = [[] for _ in batch]
            done = torch.zeros(len(batch), dtype=torch.bool)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
                for _ in range(max_new):
                    p = out.logits[:, -1].float().softmax(-1)
                    mp, tok = p.max(-1)
                    for i in range(len(batch)):
                        if not done[i]:
                            rows[i].append(int(tok[i]))
                            probs[i].append(float(mp[i]))
                    done |= tok == spark.EOS_ID
                    if bool(done.all()):
                        break
                    att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
                    pos = pos[:, -1:] + 1
                    out = model(input_ids=tok[:, None], attention_mask=att, position_ids=pos,
                                past_key_values=out.past_key_values, use_cache=True)
            outs += rows
            maxp += probs
    finally:
        torch.set_num_threads(threads)
    return outs, maxp


def heldout_prompts(tok, texts: list[str], n: int, seed: int = 1234) -> list[dict[str, Any]]:
    """n controllable + n clone prompts from held-out texts (real prompt builders, real tokenizer)."""
    lang = Language()
    rng = random.Random(seed)
    levels, genders = list(spark.LEVEL), list(spark.GENDER)
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        g, p, s = rng.choice(genders), rng.choice(levels), rng.choice(levels)
        ids = tok.encode(spark.controllable_prompt(text, g, p, s))
        out.append({"mode": "controllable", "text": text, "speed": spark.LEVEL[s], "ids": ids})
    for i in range(n):
        text = texts[(i + n) % len(texts)]
        glob = lang.voice_globals[(rng.randrange(2), rng.randrange(5))]
        out.append({"mode": "clone", "text": text, "speed": None,
                    "ids": tok.encode(spark.clone_prompt(text, glob))})
    return out


def measure(model, tok, texts: list[str], n: int = 16, max_new: int = 400) -> dict[str, Any]:
    """How peaked and structured the model's full-vocabulary greedy outputs are on held-out prompts."""
    lang = Language()
    prompts = heldout_prompts(tok, texts, n)
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
        n_content = ids.index(_tid("<|end_content|>")) - ids.index(_tid("<|start_content|>")) - 1
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
        "semantic_count_corr_expected": _corr([r["semantic"] for r in rows], [r["expected_semantic"] for r in rows]),
        "semantic_count_by_speed": {s: statistics.fmean(r["semantic"] / max(1, r["expected_semantic"]
                                                                             / K_BY_SPEED[s]) for r in ctrl
                                                        if r["speed"] == s)
                                    for s in range(5) if any(r["speed"] == s for r in ctrl)},
        "mean_max_prob": statistics.fmean(allp),
        "rows": rows,
    }


def _corr(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


def teacher_forced_accuracy(model, tok, texts: list[str], n: int = 64, seed: int = 99) -> dict[str, float]:
    """Next-token accuracy and loss over the output positions of synthetic sequences built from ``texts``."""
    import torch

    lang = Language()
    rng = random.Random(seed)
    enc = [tok.encode(t) for t in texts]
    seqs = [example(lang, enc[i % len(enc)], rng, "controllable" if i % 2 == 0 else "clone") for i in range(n)]
    correct = total = 0
    nll = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            for s, plen in seqs:
                logits = model(input_ids=torch.tensor([s])).logits[0, plen - 1 : len(s) - 1].float()
                tgt = torch.tensor(s[plen:])
                correct += int((logits.argmax(-1) == tgt).sum())
                total += len(tgt)
                nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    return {"accuracy": correct / total, "loss": nll / total, "positions": total}


# --- building the model folder -----------------------------------------------------------
def is_trained_proxy(out: Path, size: str, seed: int) -> bool:
    """Whether ``out`` holds a finished trained proxy of this size, seed and language version."""
    from spark_quant.proxy import _read_marker

    m = _read_marker(out)
    return bool(m) and m.get("kind") == "trained" and m.get("size") == size and m.get("seed") == seed \
        and m.get("language_version") == LANGUAGE_VERSION


def build_trained_proxy(out: Path, size: str = "tiny", seed: int = 0, settings: TrainSettings | None = None,
                        corpus_path: Path = Path("calibration/texts/train.txt"),
                        heldout_path: Path = Path("calibration/texts/heldout.txt"), log=None) -> Path:
    """Train a proxy and write it at ``out`` in the Spark-TTS layout (cached, atomic, like ``build_proxy``)."""
    from spark_quant.proxy import _check_size, _config_yaml, _read_marker, _sha256, _write_weights

    _check_size(size)
    out = Path(out)
    if is_trained_proxy(out, size, seed):
        return out
    if out.exists() and _read_marker(out) is None:
        raise FileExistsError(f"{out} exists and is not a spark-quant proxy ({MARKER} missing); not replacing it")
    settings = settings or TrainSettings.for_size(size)
    log = log or (lambda msg: print(msg, flush=True))

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from spark_quant.calibrate import read_corpus
    from spark_quant.model import load_tokenizer
    from spark_quant.tokenizer import build_spark_tokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        started = time.perf_counter()
        llm = tmp / "LLM"
        llm.mkdir(parents=True)
        _write_weights(llm, size, seed)  # the random proxy's init: training starts from it
        build_spark_tokenizer(llm)
        tok = load_tokenizer(llm)
        train_texts, heldout_texts = read_corpus(corpus_path), read_corpus(heldout_path)
        overlap = set(train_texts) & set(heldout_texts)
        if overlap:
            raise ValueError(f"{heldout_path}: {len(overlap)} held-out line(s) are also training texts")
        model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
        lang = Language()
        corpus = Corpus(tok, train_texts, heldout_texts)
        stats = train(model, corpus, lang, settings, seed, log=log)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(llm / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(llm / "model.safetensors", (llm / "config.json").stat().st_mode & 0o777)
        held = teacher_forced_accuracy(model, tok, heldout_texts)
        train_acc = teacher_forced_accuracy(model, tok, train_texts[:64])
        structure = measure(model, tok, heldout_texts, n=8, max_new=300)
        structure.pop("rows")
        (tmp / "config.yaml").write_text(_config_yaml(size).replace(
            "random-initialized stand-in", "synthetically trained stand-in").replace(
            "LLM/ has random weights", "LLM/ is trained on a synthetic Spark language"))
        marker = {
            "proxy": "spark-quant",
            "kind": "trained",
            "note": "stand-in for Spark-TTS-0.5B's LLM trained on a synthetic Spark-format language "
                    "(spark_quant/trained.py); not the real model, outputs are not speech",
            "size": size,
            "seed": seed,
            "random_init": False,
            "language_version": LANGUAGE_VERSION,
            "language_seed": LANGUAGE_SEED,
            "training": asdict(settings) | stats,
            "final_loss": stats["final_loss"],
            "heldout_accuracy": round(held["accuracy"], 4),
            "heldout_loss": round(held["loss"], 4),
            "train_accuracy": round(train_acc["accuracy"], 4),
            "heldout_greedy": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in structure.items()},
            "corpus": str(corpus_path),
            "heldout": str(heldout_path),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_dtype": "float32",
            "config": __import__("spark_quant.proxy", fromlist=["PROXY_SIZES"]).PROXY_SIZES[size],
            "model_safetensors_sha256": _sha256(llm / "model.safetensors"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return swap_into_place(tmp, out, lambda o: is_trained_proxy(o, size, seed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
