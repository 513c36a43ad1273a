"""Reading the user's text inputs: the calibration / held-out corpus and BiCodec reference files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.errors import UserError

# the files of a calibration folder (calibration/runs/<experiment>/)
SAMPLES = "samples.jsonl"
REFERENCES = "references.jsonl"


def read_corpus(path: Path, field: str = "calibration.corpus") -> list[str]:
    """Non-empty lines of a UTF-8 corpus; one-line errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {field} file not found; set {field} to a UTF-8 text file, one sentence a line")
    text = _decode_utf8(path, "corpus")
    for n, ln in enumerate(text.splitlines(), 1):
        check_no_special_tokens(ln, f"{path}: line {n}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{path}: corpus is empty; it needs at least one sentence")
    return lines


_SPECIAL = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?tool_call>")


def special_tokens() -> frozenset[str]:
    """Every string the Spark-TTS tokenizer turns into one special or added token (Qwen's and Spark's)."""
    global _SPECIALS
    if _SPECIALS is None:
        _SPECIALS = frozenset(spark.QWEN_SPECIALS) | frozenset(spark.spark_added_tokens())
    return _SPECIALS


_SPECIALS: frozenset[str] | None = None


def check_no_special_tokens(text: str, where: str) -> None:
    """Refuse text holding a control-token string: the tokenizer would make it that token, not text
    (``<|im_end|>`` in a sentence would end the prompt; ``<|bicodec_global_5|>`` would be a voice code)."""
    for m in _SPECIAL.finditer(text):
        if m.group(0) in special_tokens():
            raise UserError(f"{where}: contains {m.group(0)!r}, a Spark-TTS/Qwen special token (it would become "
                            "that token id, not text); remove it or write it differently")


def _decode_utf8(path: Path, what: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8; re-save the {what} as UTF-8") from None


def read_references(path: Path) -> list[dict[str, Any]]:
    """User-supplied BiCodec references: JSONL of {global: [32 ints], semantic: [ints], text: str?}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: calibration.references not found; give a JSONL of BiCodec tokens or set it to null")
    refs = []
    for n, line in enumerate(_decode_utf8(path, "references file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            g, s = r["global"], r.get("semantic", [])
            if not isinstance(r.get("text") or "", str):
                raise ValueError(f"text must be a string, got {type(r['text']).__name__}")
            spark.check_codes("semantic", s, spark.SEMANTIC_CODEBOOK)
            spark.clone_prompt("x", g, r.get("text") or None, s if r.get("text") else None)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: line {n}: not a BiCodec reference ({e}); expected {{\"global\": [32 ints], "
                            f"\"semantic\": [ints], \"text\": \"...\"}}") from None
        check_no_special_tokens(r.get("text") or "", f"{path}: line {n}: text")
        refs.append({"global": list(g), "semantic": list(s), "text": r.get("text") or ""})
    if not refs:
        raise UserError(f"{path}: no references in the file")
    return refs


def read_heldout(heldout: Path, train: Path) -> list[str]:
    """The held-out texts, refused if any line is also a calibration text."""
    texts = read_corpus(heldout, "eval.heldout")
    seen = set(read_corpus(train))
    overlap = [t for t in texts if t in seen]
    if overlap:
        raise UserError(f"{heldout}: {len(overlap)} line(s) also in {train} (e.g. {overlap[0][:40]!r}); "
                        "held-out texts must never be in calibration")
    return texts
