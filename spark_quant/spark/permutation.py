"""The Spark serving profile's vocabulary permutation: a swap that puts the ids Spark-TTS can emit first.

    profile id k            <-> original id EMIT[k]   for k < N   (EMIT = Spark ids, then EOS)
    profile id EMIT[k]      <-> original id k         for k < N   (the displaced text tokens)
    every other id keeps its number

The swap is its own inverse. ``LLM/spark_profile.json`` holds it; the serving worker maps prompts with
``to_profile`` and outputs with ``to_original`` (see ``models/serving_profile.py`` for the weight transform).
Pure Python: imported by the serving layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.errors import UserError

PROFILE_MARKER = "spark_profile.json"
ARCHITECTURE = "SparkQwen2ForCausalLM"
N_FIELD = "spark_emit_vocab_size"
PROFILE_VERSION = 1


def profile_emit_order() -> list[int]:
    """Original ids of profile ids 0..N-1: Spark's added tokens in order (global_0 -> 0), then EOS."""
    return list(range(spark.SPARK_FIRST_ID, spark.SPARK_LAST_ID + 1)) + [spark.EOS_ID]


class Permutation:
    """The profile's id swap. ``to_profile`` and ``to_original`` are the same map (a swap is an involution)."""

    def __init__(self, emit: list[int], vocab_size: int):
        n = len(emit)
        if len(set(emit)) != n or min(emit) < n or max(emit) >= vocab_size:
            raise ValueError("emittable ids must be distinct, >= their count and < vocab_size")
        self.emit = list(emit)
        self.n = n
        self.vocab_size = vocab_size
        table = list(range(vocab_size))
        for k, orig in enumerate(emit):
            table[orig], table[k] = k, orig
        self.table = table

    @classmethod
    def spark(cls, vocab_size: int = spark.VOCAB_SIZE) -> Permutation:
        return cls(profile_emit_order(), vocab_size)

    def to_profile(self, ids: list[int]) -> list[int]:
        t = self.table
        return [t[i] for i in ids]

    def to_original(self, ids: list[int]) -> list[int]:
        t = self.table
        return [t[i] for i in ids]

    def marker(self) -> dict[str, Any]:
        return {
            "spark_profile": PROFILE_VERSION,
            N_FIELD: self.n,
            "vocab_size": self.vocab_size,
            "permutation": "swap: profile id k <-> original id emit_original_ids[k] for k < N; others unchanged",
            "emit_original_ids": self.emit,
        }

    @classmethod
    def from_marker(cls, m: dict[str, Any]) -> Permutation:
        return cls(m["emit_original_ids"], m["vocab_size"])


def load_permutation(llm: Path) -> Permutation | None:
    """The permutation of a profile ``LLM/`` folder, or None if it is not a profile."""
    path = Path(llm) / PROFILE_MARKER
    if not path.is_file():
        return None
    try:
        return Permutation.from_marker(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise UserError(f"{path}: unreadable Spark profile marker ({e}); rebuild with `spark-quant serving-profile`") \
            from None
