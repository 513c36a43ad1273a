"""Reading the user's text inputs: the calibration / held-out corpus and BiCodec reference files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.errors import UserError

# the files of a calibration folder (calibration/runs/<experiment>/)
SAMPLES = "samples.jsonl"
REFERENCES = "references.jsonl"


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


def read_heldout(heldout: Path, train: Path) -> list[str]:
    """The held-out texts, refused if any line is also a calibration text."""
    texts = read_corpus(heldout)
    seen = set(read_corpus(train))
    overlap = [t for t in texts if t in seen]
    if overlap:
        raise UserError(f"{heldout}: {len(overlap)} line(s) also in {train} (e.g. {overlap[0][:40]!r}); "
                        "held-out texts must never be in calibration")
    return texts
