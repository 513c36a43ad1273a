"""A structural recipe check for environments without llm-compressor (e.g. the serving one).

The quantization environment checks recipes with llm-compressor itself
(``quantize.load_recipe``); this one only catches what can be seen without it.
"""

from __future__ import annotations

from pathlib import Path

from spark_quant.errors import UserError
from spark_quant.yamlio import read_yaml

# llm-compressor 0.14 modifiers a recipe may name
KNOWN_MODIFIERS = {
    "SmoothQuantModifier", "GPTQModifier", "QuantizationModifier", "AWQModifier", "SparseGPTModifier",
    "WandaPruningModifier", "MagnitudePruningModifier", "ConstantPruningModifier", "SpinQuantModifier",
    "QuIPModifier", "AutoRoundModifier", "LogarithmicEqualizationModifier", "OutputDistillationModifier",
    "IMatrixGatherer", "SmoothQuantModifierV2",
}


def read_recipe(path: Path) -> dict:
    """The recipe file as a mapping of stages; one-line errors for a missing file, bad YAML or a wrong shape."""
    data = read_yaml(path, "recipe", "see recipes/ for llm-compressor YAML recipes")
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: a recipe is a mapping of stages to modifiers (see recipes/w8a8_int8_sq_gptq.yaml)")
    return data


def check_structure(path: Path) -> None:
    path = Path(path)
    data = read_recipe(path)
    found = 0
    for stage, groups in data.items():
        if not isinstance(groups, dict):
            raise UserError(f"{path}: {stage}: expected a mapping of modifier groups")
        for group, mods in groups.items():
            if not group.endswith("_modifiers") or not isinstance(mods, dict):
                continue
            for name in mods:
                if name not in KNOWN_MODIFIERS:
                    raise UserError(f"{path}: {stage}.{group}.{name}: unknown modifier; "
                                    f"known: {', '.join(sorted(KNOWN_MODIFIERS))}")
                found += 1
    if not found:
        raise UserError(f"{path}: no modifiers found (expected STAGE: NAME_modifiers: Modifier: {{...}})")
