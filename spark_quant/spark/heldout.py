"""The one held-out prompt-set builder: controllable and voice-clone prompts from held-out texts, seeded.

Used by the eval stage (held-out texts, clone voices from the calibration's references), the trained proxy's
measurement (its synthetic voices) and the serving-profile timing tool.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from spark_quant import spark

GlobalsFor = Callable[[int, random.Random], Sequence[int]]


def random_globals(i: int, rng: random.Random) -> list[int]:
    """32 global tokens drawn from the prompt set's own generator (no reference voice at hand)."""
    return [rng.randrange(spark.GLOBAL_CODEBOOK) for _ in range(spark.N_GLOBAL)]


def heldout_prompts(texts: Sequence[str], n: int, encode: Callable[[str], list[int]], seed: int = 1234,
                    clone_globals: GlobalsFor = random_globals) -> list[dict[str, Any]]:
    """``n`` controllable prompts (random gender / pitch / speed labels), then ``n`` clone prompts whose
    32 global tokens come from ``clone_globals(i, rng)``; texts are taken in order, wrapping around.

    Each prompt: ``{"mode", "text", "speed" (level index, controllable only), "ids"}``.
    """
    rng = random.Random(seed)
    levels, genders = list(spark.LEVEL), list(spark.GENDER)
    out: list[dict[str, Any]] = []
    for i in range(n):
        text = texts[i % len(texts)]
        g, p, s = rng.choice(genders), rng.choice(levels), rng.choice(levels)
        out.append({"mode": "controllable", "text": text, "speed": spark.LEVEL[s],
                    "ids": encode(spark.controllable_prompt(text, g, p, s))})
    for i in range(n):
        text = texts[(i + n) % len(texts)]
        glob = list(clone_globals(i, rng))
        out.append({"mode": "clone", "text": text, "speed": None, "ids": encode(spark.clone_prompt(text, glob))})
    return out
