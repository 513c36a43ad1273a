"""Does the upstream folder a stage reads hold what the experiment asks for?

A stage skips itself when its own inputs did not change, but its inputs are the upstream folder's files: a
calibration made with 8 samples is "unchanged" even when the experiment now asks for 64. So before that,
``quantize`` checks its calibration folder and ``eval`` its checkpoint against the experiment, and stop with
one line naming what differs (``make`` reruns the upstream stage first, so through make this never trips).
Only the pipeline's own folders are checked: a folder given with ``--calibration`` / ``--checkpoint`` is the
user's explicit choice.

Also here: llm-compressor's silent degradations (GPTQ falling back to round-to-nearest, ...), caught from its
loguru log during ``oneshot`` and turned into a manifest entry and, unless allowed, a failed stage.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spark_quant.artifacts import fingerprint, sha256_file
from spark_quant.config import Experiment
from spark_quant.errors import StageFailed, UserError
from spark_quant.models.folder import model_fingerprint

# llm-compressor 0.14 warnings that mean the recipe was not applied as written
DEGRADATIONS = re.compile(r"round-to-nearest|failed to invert hessian|hessian inversion failed|nan or inf", re.IGNORECASE)


def calibration_inputs(exp: Experiment, model_dir: Path) -> dict[str, Any]:
    """What a calibration folder is made from (its manifest's ``inputs``)."""
    cfg = exp.calibration
    return {
        "config": cfg.model_dump(mode="json"),
        "corpus_sha256": sha256_file(cfg.corpus),
        "references_sha256": sha256_file(cfg.references) if cfg.references else None,
        "model": model_fingerprint(model_dir),
    }


def _config_diff(made: dict[str, Any], asked: dict[str, Any], prefix: str) -> list[str]:
    keys = sorted(set(made) | set(asked))
    return [f"{prefix}{k}={made.get(k)!r} (the experiment asks {asked.get(k)!r})" for k in keys
            if made.get(k) != asked.get(k)]


def calibration_differences(exp: Experiment, model_dir: Path, calib: dict[str, Any]) -> list[str]:
    """How the calibration folder (its manifest ``calib``) differs from what ``exp`` asks; [] = it matches."""
    want = calibration_inputs(exp, model_dir)
    made = calib.get("inputs") or {}
    if calib.get("inputs_fingerprint") == fingerprint(want):
        return []
    diff = _config_diff(made.get("config") or {}, want["config"], "calibration.")
    if made.get("corpus_sha256") != want["corpus_sha256"]:
        diff.append(f"another corpus (calibration.corpus {exp.calibration.corpus} changed)")
    if made.get("references_sha256") != want["references_sha256"]:
        diff.append("other references (calibration.references)")
    if made.get("model") != want["model"]:
        diff.append("another model")
    return diff or ["other inputs"]


def check_calibration(exp: Experiment, model_dir: Path, calib_dir: Path, calib: dict[str, Any]) -> None:
    diff = calibration_differences(exp, model_dir, calib)
    if diff:
        raise UserError(f"{calib_dir}: was made with {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}; "
                        "run `make calibrate` (or `make quantize`, which runs it first), or pass --calibration "
                        "to use this folder anyway")


def check_checkpoint(exp: Experiment, model_dir: Path, ckpt_dir: Path, qman: dict[str, Any]) -> None:
    """The checkpoint's manifest against the recipe, calibration and model the experiment asks for."""
    made = qman.get("inputs") or {}
    diff = []
    recipe = Path(exp.recipe)
    if recipe.is_file() and made.get("recipe") != recipe.read_text(encoding="utf-8"):
        diff.append(f"another recipe than {recipe} ({made.get('recipe_path')})")
    for field in ("max_seq_length", "batch_size"):
        if field in made and made[field] != getattr(exp.calibration, field):
            diff.append(f"calibration.{field}={made[field]!r} (the experiment asks {getattr(exp.calibration, field)!r})")
    if made.get("model") != model_fingerprint(model_dir):
        diff.append(f"another model than {model_dir}")
    elif "calibration_fingerprint" in made:
        if made["calibration_fingerprint"] != fingerprint(calibration_inputs(exp, model_dir)):
            diff.append("another calibration than the experiment's calibration settings give")
    else:  # a manifest from before calibration fingerprints: compare the settings it recorded
        diff += _config_diff((qman.get("config") or {}).get("calibration") or {},
                             exp.calibration.model_dump(mode="json"), "calibration.")
    if qman.get("fallbacks") and not exp.quantize_allow_fallback:
        diff.append(f"llm-compressor fallbacks ({qman['fallbacks'][0][:120]}) that the experiment does not allow "
                    "(quantize_allow_fallback: false)")
    if diff:
        raise UserError(f"{ckpt_dir}: was made with {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}; "
                        "run `make quantize` (or `make eval`, which runs it first), or pass --checkpoint to "
                        "evaluate this folder anyway")


@contextlib.contextmanager
def llmcompressor_warnings() -> Iterator[list[dict[str, str]]]:
    """Every WARNING-or-worse record llm-compressor logs (through loguru) inside the block; its METRIC records
    (a level of its own above WARNING: GPTQ's per-layer time and error) are measurements, not warnings."""
    from loguru import logger

    seen: list[dict[str, str]] = []

    def sink(message) -> None:
        rec = message.record
        seen.append({"level": rec["level"].name, "where": f"{rec['name']}:{rec['function']}",
                     "message": str(rec["message"])[:2000]})

    handler = logger.add(sink, level="WARNING", format="{message}", filter=lambda r: r["level"].name != "METRIC")
    try:
        yield seen
    finally:
        logger.remove(handler)


def degradations(warnings: list[dict[str, str]]) -> list[str]:
    """The warnings that say the recipe was not applied as written (e.g. GPTQ -> round-to-nearest)."""
    return [w["message"] for w in warnings if DEGRADATIONS.search(w["message"])]


def check_degradations(fallbacks: list[str], exp: Experiment, recipe: Path) -> None:
    if fallbacks and not exp.quantize_allow_fallback:
        what = ". ".join(fallbacks[0].split(". ")[:2]).rstrip(".")[:240]  # "Hessian inversion failed for 28/28 ..."
        raise StageFailed(f"{recipe}: llm-compressor did not apply the recipe as written ({what}); "
                          "fix the recipe (e.g. GPTQModifier.dampening_frac) or more calibration samples, or set "
                          "quantize_allow_fallback: true to keep such a checkpoint")
