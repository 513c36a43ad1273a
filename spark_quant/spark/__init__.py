"""Everything spark-quant knows about Spark-TTS-0.5B, in one place.

Token ids, label maps, prompt builders and the output parser. Pure Python:
no torch, no transformers, so every environment (quantization, serving, the
orchestrating CLI) can import it. Facts come from the public Spark-TTS sources
(`cli/SparkTTS.py`, `sparktts/utils/token_parser.py`); see README "Spark-TTS facts".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# --- the base Qwen2.5 vocabulary ------------------------------------------------
QWEN_BPE_SIZE = 151_643  # byte-level BPE ranks 0..151642
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_SPECIAL_START = 151_643
PAD_ID = 151_643  # <|endoftext|>
BOS_ID = 151_643
EOS_ID = 151_645  # <|im_end|>
VOCAB_SIZE = 166_000  # embedding rows; 165158..165999 are padding

# --- Spark's added tokens, in the order expand_tokenizer.py added them --------
SPARK_FIRST_ID = 151_665
_RANGES: tuple[tuple[str, int], ...] = (
    ("bicodec_global", 4096),
    ("bicodec_semantic", 8192),
    ("pitch_value", 1001),
    ("pitch_var_value", 11),
    ("pitch_label", 5),
    ("pitch_var_label", 5),
    ("speed_value", 11),
    ("speed_label", 5),
    ("loudness_value", 31),
    ("loudness_label", 5),
    ("age", 5),
    ("gender", 3),
    ("emotion", 101),
)
TASKS = (
    "task_vc",
    "task_tts",
    "task_asr",
    "task_s2s",
    "task_t2s",
    "task_cap",
    "task_understand",
    "task_controllable_tts",
    "task_prompt_tts",
    "task_edit",
)
MARKERS = ("content", "style_label", "style_prompt", "acoustic_token", "global_token", "semantic_token")


def spark_added_tokens() -> list[str]:
    """The 13,493 tokens Spark-TTS adds after Qwen's specials, in id order."""
    toks: list[str] = []
    for name, n in _RANGES:
        toks += [f"<|{name}_{i}|>" for i in range(n)]
    toks += [f"<|{t}|>" for t in TASKS]
    toks += [f"<|start_{m}|>" for m in MARKERS]
    toks += [f"<|end_{m}|>" for m in MARKERS]
    return toks


def _range_starts() -> dict[str, int]:
    starts, nxt = {}, SPARK_FIRST_ID
    for name, n in _RANGES:
        starts[name] = nxt
        nxt += n
    return starts


RANGE_START = _range_starts()
RANGE_SIZE = dict(_RANGES)
SPARK_LAST_ID = SPARK_FIRST_ID + len(spark_added_tokens()) - 1  # 165157

GLOBAL_CODEBOOK = 4096
SEMANTIC_CODEBOOK = 8192
N_GLOBAL = 32
SEMANTIC_PER_SECOND = 50
SAMPLE_RATE = 16_000


def token_id(token: str) -> int:
    """Spark/Qwen id of a special or added token, e.g. ``<|task_tts|>`` -> 165137."""
    if token in QWEN_SPECIALS:
        return QWEN_SPECIAL_START + QWEN_SPECIALS.index(token)
    return _ADDED_INDEX[token]


_ADDED_INDEX = {t: SPARK_FIRST_ID + i for i, t in enumerate(spark_added_tokens())}


def global_id(i: int) -> int:
    return RANGE_START["bicodec_global"] + i


def semantic_id(i: int) -> int:
    return RANGE_START["bicodec_semantic"] + i


def is_semantic_id(tok: int) -> bool:
    return RANGE_START["bicodec_semantic"] <= tok < RANGE_START["bicodec_semantic"] + SEMANTIC_CODEBOOK


def is_global_id(tok: int) -> bool:
    return RANGE_START["bicodec_global"] <= tok < RANGE_START["bicodec_global"] + GLOBAL_CODEBOOK


# --- labels ----------------------------------------------------------------------
GENDER = {"female": 0, "male": 1}
LEVEL = {"very_low": 0, "low": 1, "moderate": 2, "high": 3, "very_high": 4}


def _check(name: str, value: str, mapping: dict[str, int]) -> int:
    if value not in mapping:
        raise ValueError(f"{name} must be one of {sorted(mapping, key=mapping.get)}, got {value!r}")
    return mapping[value]


# --- prompt builders (no chat template, no BOS; pieces joined with "") ----------
def controllable_prompt(text: str, gender: str, pitch: str, speed: str) -> str:
    """'Create a voice' prompt: text plus gender / pitch / speed labels."""
    g = _check("gender", gender, GENDER)
    p = _check("pitch", pitch, LEVEL)
    s = _check("speed", speed, LEVEL)
    return (
        "<|task_controllable_tts|><|start_content|>"
        f"{text}<|end_content|><|start_style_label|>"
        f"<|gender_{g}|><|pitch_label_{p}|><|speed_label_{s}|><|end_style_label|>"
    )


def check_codes(kind: str, codes: list[int], codebook: int) -> None:
    """BiCodec codes are integers in the codebook: 1.0 or true would become literal text in the prompt."""
    if not isinstance(codes, (list, tuple)):
        raise ValueError(f"{kind} tokens must be a list of integers, got {type(codes).__name__}")
    for c in codes:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"{kind} token {c!r} is not an integer (write 5, not 5.0 or true)")
        if not 0 <= c < codebook:
            raise ValueError(f"{kind} token {c} outside the codebook 0..{codebook - 1}")


def _check_globals(global_tokens: list[int]) -> None:
    if not isinstance(global_tokens, (list, tuple)) or len(global_tokens) != N_GLOBAL:
        n = len(global_tokens) if isinstance(global_tokens, (list, tuple)) else type(global_tokens).__name__
        raise ValueError(f"voice cloning needs exactly {N_GLOBAL} global tokens, got {n}")
    check_codes("global", global_tokens, GLOBAL_CODEBOOK)


def clone_prompt(
    text: str,
    global_tokens: list[int],
    prompt_text: str | None = None,
    semantic_tokens: list[int] | None = None,
) -> str:
    """Voice-clone prompt from a reference's 32 global (and semantic) BiCodec codes.

    With ``prompt_text`` (the reference transcript) the content is
    ``prompt_text + text`` and the prompt ends inside the semantic block with
    the reference's own semantic tokens, which the model continues.
    """
    _check_globals(global_tokens)
    globals_str = "".join(f"<|bicodec_global_{g}|>" for g in global_tokens)
    if prompt_text is None:
        return (
            f"<|task_tts|><|start_content|>{text}<|end_content|>"
            f"<|start_global_token|>{globals_str}<|end_global_token|>"
        )
    if not semantic_tokens:
        raise ValueError("a clone prompt with the reference transcript needs the reference's semantic tokens")
    check_codes("semantic", semantic_tokens, SEMANTIC_CODEBOOK)
    sem_str = "".join(f"<|bicodec_semantic_{s}|>" for s in semantic_tokens)
    return (
        f"<|task_tts|><|start_content|>{prompt_text}{text}<|end_content|>"
        f"<|start_global_token|>{globals_str}<|end_global_token|>"
        f"<|start_semantic_token|>{sem_str}"
    )


# --- output parsing --------------------------------------------------------------
_SEM = re.compile(r"bicodec_semantic_(\d+)")
_GLOB = re.compile(r"bicodec_global_(\d+)")


@dataclass
class SparkOutput:
    """What one generation contains, and whether BiCodec could decode it."""

    mode: str  # "controllable" or "clone"
    global_tokens: list[int] = field(default_factory=list)
    semantic_tokens: list[int] = field(default_factory=list)
    finished: bool = False  # EOS seen before the token limit

    @property
    def audio_seconds(self) -> float:
        return len(self.semantic_tokens) / SEMANTIC_PER_SECOND

    @property
    def problems(self) -> list[str]:
        out = []
        if self.mode == "controllable" and len(self.global_tokens) != N_GLOBAL:
            out.append(f"{len(self.global_tokens)} global tokens (need {N_GLOBAL})")
        if not self.semantic_tokens:
            out.append("no semantic tokens")
        if not self.finished:
            out.append("no EOS before the token limit (runaway)")
        return out

    @property
    def valid(self) -> bool:
        return not self.problems


def parse_text(text: str, mode: str, finished: bool = True) -> SparkOutput:
    """Parse decoded text the way Spark-TTS does (regex over the token names)."""
    return SparkOutput(
        mode=mode,
        global_tokens=[int(m) for m in _GLOB.findall(text)] if mode == "controllable" else [],
        semantic_tokens=[int(m) for m in _SEM.findall(text)],
        finished=finished,
    )


def parse_ids(ids: list[int], mode: str) -> SparkOutput:
    """Parse generated token ids directly (no detokenization needed)."""
    finished = EOS_ID in ids
    if finished:
        ids = ids[: ids.index(EOS_ID)]
    g0, s0 = RANGE_START["bicodec_global"], RANGE_START["bicodec_semantic"]
    return SparkOutput(
        mode=mode,
        global_tokens=[t - g0 for t in ids if is_global_id(t)] if mode == "controllable" else [],
        semantic_tokens=[t - s0 for t in ids if is_semantic_id(t)],
        finished=finished,
    )


def emittable_ids() -> list[int]:
    """Every id Spark-TTS can emit: audio, label and marker tokens, and EOS."""
    return [EOS_ID] + list(range(SPARK_FIRST_ID, SPARK_LAST_ID + 1))


# --- tokenizer check -------------------------------------------------------------
CHECKPOINTS = {
    "<|endoftext|>": 151_643,
    "<|im_end|>": 151_645,
    "<|bicodec_global_0|>": 151_665,
    "<|bicodec_global_4095|>": 155_760,
    "<|bicodec_semantic_0|>": 155_761,
    "<|bicodec_semantic_8191|>": 163_952,
    "<|task_tts|>": 165_137,
    "<|task_controllable_tts|>": 165_143,
    "<|start_content|>": 165_146,
    "<|start_global_token|>": 165_150,
    "<|start_semantic_token|>": 165_151,
    "<|end_content|>": 165_152,
    "<|end_global_token|>": 165_156,
    "<|end_semantic_token|>": 165_157,
}


def tokenizer_problems(vocab: dict[str, int]) -> list[str]:
    """Differences between a tokenizer's vocabulary and Spark-TTS's ids (empty = compatible).

    ``vocab`` is ``tokenizer.get_vocab()``; the check covers every added token.
    """
    problems = []
    for tok, want in CHECKPOINTS.items():
        got = vocab.get(tok)
        if got != want:
            problems.append(f"{tok} is {'missing' if got is None else got}, Spark-TTS has {want}")
    if problems:
        return problems
    for i, tok in enumerate(spark_added_tokens()):
        if vocab.get(tok) != SPARK_FIRST_ID + i:
            problems.append(f"{tok} is {vocab.get(tok, 'missing')}, Spark-TTS has {SPARK_FIRST_ID + i}")
            break
    return problems
