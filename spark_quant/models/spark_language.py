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
  They count down over the content: code ``4 * (128 * voice + b) + r`` for b = n-1 .. 0
  and r = 0 .. K-1, then ``<|im_end|>``. The first code carries the number of content
  tokens (the model must count the text), the rest is a chain the voice and speed fix;
- voice clone (``spark.clone_prompt`` without transcript) -> ``<|start_semantic_token|>``
  + the countdown at K = 2 in the reference's voice (the voice whose table the 32
  reference globals are; any other reference gets an 11th range) + ``<|im_end|>``;
- voice clone with transcript: the content is transcript + text, the prompt ends with
  the reference's part of the countdown, and the model continues it to ``<|im_end|>``.
"""

from __future__ import annotations

import random

from spark_quant import spark

LANGUAGE_VERSION = 1


LANGUAGE_SEED = 20261127  # fixes the synthetic language's tables; not the training seed


K_BY_SPEED = (3, 2, 2, 1, 1)  # semantic tokens per content token, speed very_low .. very_high


CLONE_K = 2


MAX_BLOCKS = 128  # content tokens counted; longer content is cut to this many in the output


OTHER_VOICE = 10  # clone references that are not one of the 10 voice tables


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
            [spark.token_id("<|start_acoustic_token|>"), spark.RANGE_START["pitch_value"] + self.pitch_value(gender, pitch),
             spark.RANGE_START["speed_value"] + self.speed_value(speed), spark.token_id("<|end_acoustic_token|>"),
             spark.token_id("<|start_global_token|>")]
            + [spark.global_id(x) for x in self.voice_globals[(gender, pitch)]]
            + [spark.token_id("<|end_global_token|>"), spark.token_id("<|start_semantic_token|>")]
            + [spark.semantic_id(s) for s in self.semantic(len(content), K_BY_SPEED[speed], gender * 5 + pitch)]
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
        return prompt + lang.controllable_output(content, g, p, s), len(prompt)
    if rng.random() < 0.75:
        glob = lang.voice_globals[(rng.randrange(2), rng.randrange(5))]
    else:
        glob = [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(spark.N_GLOBAL)]
    ref = transcript or []
    prompt = ([spark.token_id("<|task_tts|>"), spark.token_id("<|start_content|>")] + ref + content
              + [spark.token_id("<|end_content|>"), spark.token_id("<|start_global_token|>")]
              + [spark.global_id(x) for x in glob] + [spark.token_id("<|end_global_token|>")])
    sem = [spark.semantic_id(x) for x in lang.semantic(len(ref) + len(content), CLONE_K, lang.voice_of(glob))]
    if not ref:
        return prompt + [spark.token_id("<|start_semantic_token|>")] + sem + [spark.EOS_ID], len(prompt)
    # with the transcript, the prompt ends inside the semantic block with the reference's own tokens
    cut = min(len(ref) * CLONE_K, len(sem) - 1)
    prompt += [spark.token_id("<|start_semantic_token|>")] + sem[:cut]
    return prompt + sem[cut:] + [spark.EOS_ID], len(prompt)


def output_for(lang: Language, prompt_ids: list[int]) -> list[int]:
    """The language's expected continuation of a prompt without reference transcript (Spark tokenizer ids)."""
    sc, ec = spark.token_id("<|start_content|>"), spark.token_id("<|end_content|>")
    content = prompt_ids[prompt_ids.index(sc) + 1 : prompt_ids.index(ec)]
    if prompt_ids[0] == spark.token_id("<|task_controllable_tts|>"):
        g = prompt_ids[-4] - spark.RANGE_START["gender"]
        p = prompt_ids[-3] - spark.RANGE_START["pitch_label"]
        s = prompt_ids[-2] - spark.RANGE_START["speed_label"]
        return lang.controllable_output(content, g, p, s)
    g0 = prompt_ids.index(spark.token_id("<|start_global_token|>")) + 1
    glob = [t - spark.RANGE_START["bicodec_global"] for t in prompt_ids[g0 : g0 + spark.N_GLOBAL]]
    sem = lang.semantic(len(content), CLONE_K, lang.voice_of(glob))
    return [spark.token_id("<|start_semantic_token|>")] + [spark.semantic_id(x) for x in sem] + [spark.EOS_ID]
