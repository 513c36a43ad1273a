"""The synthetic Spark "language" the trained proxy learns (``LANGUAGE_VERSION``; its tables come from a
fixed seed, independent of the training seed). See ``trained.py`` for why and how it is trained.

- controllable prompt (``spark.controllable_prompt``: text, gender, pitch, speed) ->
  ``<|start_acoustic_token|><|pitch_value_N|><|speed_value_M|><|end_acoustic_token|>``
  ``<|start_global_token|>`` + 32 globals + ``<|end_global_token|>``
  ``<|start_semantic_token|>`` + semantic tokens + ``<|im_end|>`` (the grammar
  ``calibrate.grammar_steps`` constrains and ``spark.parse_ids`` parses), where
  N = 100 + 200 * pitch + 50 * gender, M = 2 * speed, and the 32 globals are the
  voice (gender, pitch)'s fixed table (10 voices, 320 distinct global ids);
- semantic tokens: K per content token, K = 3, 2, 2, 1, 1 for speed very_low ..
  very_high, so the count is (content tokens) x K and follows text length and speed.
  They count down over the content: code ``4 * b + r`` for b = n-1 .. 0 and r = 0 .. K-1,
  then ``<|im_end|>``. As in Spark-TTS, where BiCodec's global tokens carry the speaker and
  the semantic tokens the content, the semantic tokens do not depend on the voice: the
  voice is in the globals, the text (its length) in the semantic tokens. The first code
  carries the number of content tokens (the model must count the text), the rest is a chain;
  ``number_features`` gives the codes' embedding rows a shape in which nearby counts are near
  (``trained.py`` starts training from it), which is what makes the count learnable in the
  CPU budget (version 1 put each count in a per-voice range: correlation 0.39);
- voice clone (``spark.clone_prompt`` without transcript) -> ``<|start_semantic_token|>``
  + the countdown at K = 2 + ``<|im_end|>``;
- voice clone with transcript: the content is transcript + text, the prompt ends with
  the reference's part of the countdown, and the model continues it to ``<|im_end|>``;
- semantic variants (``Language(variants=V)``, V > 1; the full proxy's setting, ``trained.TrainSettings``):
  each semantic code ``c`` of a training sequence is written as ``c + VARIANT_OFFSET * j``, j drawn from
  fixed Zipf weights (``variant_weights``). Without them the language is deterministic: one output has
  probability 1, a model that learns it exactly (the full proxy on a GPU: loss 1e-5) is one-hot at every
  step, and quantization cannot move its argmax or its KL (docs/benchmarks.md, ``gpu5``: even a damaged
  recipe passed every gate). With them a model that learns the language exactly keeps
  ``semantic_entropy_nats`` of spread at every semantic position, as a sampled TTS LM does, while the
  count, the grammar and the greedy output (variant 0 everywhere, ``output_for``) stay as above;
- voiced variants (``Language(V, voiced=True)``, an experiment, off in every proxy built so far): the Zipf
  weights rotated by the voice (``voice % V`` is the modal variant), so the semantic tokens depend on the speaker
  as well as the text; a prompt whose globals are no voice's keeps the unrotated weights.
"""

from __future__ import annotations

import math
import random

from spark_quant import spark

LANGUAGE_VERSION = 2  # 2: voice-free countdown codes 4 * b + r (1: 4 * (128 * voice + b) + r)


LANGUAGE_SEED = 20261127  # fixes the synthetic language's tables; not the training seed


K_BY_SPEED = (3, 2, 2, 1, 1)  # semantic tokens per content token, speed very_low .. very_high


CLONE_K = 2


MAX_BLOCKS = 128  # content tokens counted; longer content is cut to this many in the output


CODES_PER_BLOCK = 4  # code = CODES_PER_BLOCK * b + r, r < max(K_BY_SPEED)


VARIANT_OFFSET = MAX_BLOCKS * CODES_PER_BLOCK  # variant j of code c is c + VARIANT_OFFSET * j


def variant_weights(variants: int) -> list[float]:
    """Zipf weights 1 / (j + 1) of the semantic variants j = 0 .. variants - 1, normalized."""
    w = [1.0 / (j + 1) for j in range(variants)]
    return [x / sum(w) for x in w]


class Language:
    """The tables of the synthetic Spark language (fixed by LANGUAGE_SEED); ``variants`` > 1 gives each
    semantic code that many variants with Zipf weights (see the module's docstring)."""

    def __init__(self, variants: int = 1, voiced: bool = False) -> None:
        if not 1 <= variants <= spark.SEMANTIC_CODEBOOK // VARIANT_OFFSET:
            raise ValueError(f"semantic variants: {variants} is outside 1..{spark.SEMANTIC_CODEBOOK // VARIANT_OFFSET}")
        rng = random.Random(LANGUAGE_SEED)
        ids = rng.sample(range(spark.GLOBAL_CODEBOOK), 10 * spark.N_GLOBAL)
        self.voice_globals = {(g, p): ids[(g * 5 + p) * 32 : (g * 5 + p + 1) * 32] for g in range(2) for p in range(5)}
        self.variants = variants
        self.weights = variant_weights(variants)
        self.voiced = voiced and variants > 1
        self._voice_of = {tuple(v): g * 5 + p for (g, p), v in self.voice_globals.items()}

    def voice_of(self, global_codes: list[int]) -> int | None:
        """The voice index (gender * 5 + pitch) whose 32 global codes these are; None for any other globals."""
        return self._voice_of.get(tuple(global_codes))

    def rotation(self, voice: int | None) -> int:
        """The most likely semantic variant for a voice: ``voice % variants`` in a voiced language, else 0."""
        return voice % self.variants if self.voiced and voice is not None else 0

    @property
    def semantic_entropy_nats(self) -> float:
        """Entropy of one semantic position given everything before it (0 for the deterministic language)."""
        return -sum(p * math.log(p) for p in self.weights)

    def optimal_scores(self, positions: int, semantic_positions: int) -> dict[str, float]:
        """The accuracy and mean loss of a model that knows this language exactly, over ``positions`` output
        positions of which ``semantic_positions`` are semantic codes (every other output position is determined)."""
        return {"optimal": (positions - semantic_positions * (1 - self.weights[0])) / positions,
                "loss_floor": semantic_positions * self.semantic_entropy_nats / positions}

    def vary(self, codes: list[int], rng: random.Random | None, voice: int | None = None) -> list[int]:
        """``codes`` with each one's variant drawn (no draw at all, so the same ``rng`` stream, when variants = 1),
        the Zipf weights rotated by the voice's ``rotation``; ``rng`` None gives every code its mode variant."""
        if self.variants == 1:
            return list(codes)
        r = self.rotation(voice)
        js = [0] * len(codes) if rng is None else rng.choices(range(self.variants), self.weights, k=len(codes))
        return [c + VARIANT_OFFSET * ((j + r) % self.variants) for c, j in zip(codes, js)]

    @staticmethod
    def semantic(n_content: int, k: int) -> list[int]:
        """Semantic codes (0..8191): a countdown over the content tokens, K codes each."""
        n = min(n_content, MAX_BLOCKS)
        return [CODES_PER_BLOCK * b + r for b in range(n - 1, -1, -1) for r in range(k)]

    @staticmethod
    def pitch_value(gender: int, pitch: int) -> int:
        return 100 + 200 * pitch + 50 * gender

    @staticmethod
    def speed_value(speed: int) -> int:
        return 2 * speed

    def controllable_output(self, content: list[int], gender: int, pitch: int, speed: int,
                            rng: random.Random | None = None) -> list[int]:
        """The output for a controllable prompt: semantic variants drawn from ``rng``, or variant 0 (the mode)."""
        sem = self.vary(self.semantic(len(content), K_BY_SPEED[speed]), rng, gender * 5 + pitch)
        return (
            [spark.token_id("<|start_acoustic_token|>"), spark.RANGE_START["pitch_value"] + self.pitch_value(gender, pitch),
             spark.RANGE_START["speed_value"] + self.speed_value(speed), spark.token_id("<|end_acoustic_token|>"),
             spark.token_id("<|start_global_token|>")]
            + [spark.global_id(x) for x in self.voice_globals[(gender, pitch)]]
            + [spark.token_id("<|end_global_token|>"), spark.token_id("<|start_semantic_token|>")]
            + [spark.semantic_id(s) for s in sem]
            + [spark.EOS_ID]
        )


def _ctrl_prefix(gender: int, pitch: int, speed: int) -> tuple[list[int], list[int]]:
    head = [spark.token_id("<|task_controllable_tts|>"), spark.token_id("<|start_content|>")]
    tail = [spark.token_id("<|end_content|>"), spark.token_id("<|start_style_label|>"), spark.RANGE_START["gender"] + gender,
            spark.RANGE_START["pitch_label"] + pitch, spark.RANGE_START["speed_label"] + speed,
            spark.token_id("<|end_style_label|>")]
    return head, tail


def example(lang: Language, content: list[int], rng: random.Random, kind: str,
            transcript: list[int] | None = None) -> tuple[list[int], int]:
    """(prompt + output ids, prompt length) of one synthetic sequence, ids as the tokenizer gives them."""
    if kind == "controllable":
        g, p, s = rng.randrange(2), rng.randrange(5), rng.randrange(5)
        head, tail = _ctrl_prefix(g, p, s)
        prompt = head + content + tail
        return prompt + lang.controllable_output(content, g, p, s, rng), len(prompt)
    voice = None
    if rng.random() < 0.75:
        g, p = rng.randrange(2), rng.randrange(5)
        glob, voice = lang.voice_globals[(g, p)], g * 5 + p
    else:
        glob = [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(spark.N_GLOBAL)]
    ref = transcript or []
    prompt = ([spark.token_id("<|task_tts|>"), spark.token_id("<|start_content|>")] + ref + content
              + [spark.token_id("<|end_content|>"), spark.token_id("<|start_global_token|>")]
              + [spark.global_id(x) for x in glob] + [spark.token_id("<|end_global_token|>")])
    sem = [spark.semantic_id(x) for x in lang.vary(lang.semantic(len(ref) + len(content), CLONE_K), rng, voice)]
    if not ref:
        return prompt + [spark.token_id("<|start_semantic_token|>")] + sem + [spark.EOS_ID], len(prompt)
    # with the transcript, the prompt ends inside the semantic block with the reference's own tokens
    cut = min(len(ref) * CLONE_K, len(sem) - 1)
    prompt += [spark.token_id("<|start_semantic_token|>")] + sem[:cut]
    return prompt + sem[cut:] + [spark.EOS_ID], len(prompt)


def evaluation_sequences(lang: Language, tok, texts: list[str], n: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` synthetic sequences (ids, prompt length) built from ``texts`` in turn, the prompt modes alternating
    (controllable first): what the trained proxy's teacher-forced measurements run on."""
    rng = random.Random(seed)
    enc = [tok.encode(t) for t in texts]
    return [example(lang, enc[i % len(enc)], rng, "controllable" if i % 2 == 0 else "clone") for i in range(n)]


def output_for(lang: Language, prompt_ids: list[int]) -> list[int]:
    """The language's expected continuation of a prompt without reference transcript (Spark tokenizer ids)."""
    sc, ec = spark.token_id("<|start_content|>"), spark.token_id("<|end_content|>")
    content = prompt_ids[prompt_ids.index(sc) + 1 : prompt_ids.index(ec)]
    if prompt_ids[0] == spark.token_id("<|task_controllable_tts|>"):
        g = prompt_ids[-4] - spark.RANGE_START["gender"]
        p = prompt_ids[-3] - spark.RANGE_START["pitch_label"]
        s = prompt_ids[-2] - spark.RANGE_START["speed_label"]
        return lang.controllable_output(content, g, p, s)
    g0, g1 = spark.token_id("<|start_global_token|>"), spark.token_id("<|end_global_token|>")
    glob = [t - spark.global_id(0) for t in prompt_ids[prompt_ids.index(g0) + 1 : prompt_ids.index(g1)]]
    sem = lang.vary(lang.semantic(len(content), CLONE_K), None, lang.voice_of(glob))
    return [spark.token_id("<|start_semantic_token|>")] + [spark.semantic_id(x) for x in sem] + [spark.EOS_ID]


def number_features(hidden: int, norm: float, n_freq: int = 48) -> dict[int, list[float]]:
    """Embedding rows (``hidden`` wide, length ``norm``) for the semantic codes ``4 * b + r``: sines and cosines
    of b over periods 4 .. 256 (so the rows of nearby counts b are near and a count down is a rotation), then
    a block of ones for r. ``trained.py`` mixes them into the seeded random init before training."""
    if hidden < 2 * n_freq + 8 * CODES_PER_BLOCK:
        raise ValueError(f"number_features: hidden size {hidden} < {2 * n_freq + 8 * CODES_PER_BLOCK}")
    periods = [4 * 64 ** (k / (n_freq - 1)) for k in range(n_freq)]
    rows = {}
    for b in range(MAX_BLOCKS):
        for r in range(CODES_PER_BLOCK):
            v = [0.0] * hidden
            for k, period in enumerate(periods):
                v[2 * k], v[2 * k + 1] = math.cos(2 * math.pi * b / period), math.sin(2 * math.pi * b / period)
            v[2 * n_freq + 8 * r : 2 * n_freq + 8 * r + 8] = [1.0] * 8
            scale = norm / math.sqrt(sum(x * x for x in v))
            rows[CODES_PER_BLOCK * b + r] = [x * scale for x in v]
    return rows


# --- training sequences ----------------------------------------------------------


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
    ss = spark.token_id("<|start_semantic_token|>")
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
