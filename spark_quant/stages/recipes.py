"""Reading recipes, and checking them where llm-compressor is not installed (the serving environment).

The quantization environment checks a recipe with llm-compressor itself (``load_recipe``). Elsewhere
``check_recipe`` asks the quantization environment's interpreter to do that check, so modifier names are
llm-compressor's own (no copy of its list here to drift); only without any llm-compressor at hand is the check
structural (stages of ``*_modifiers`` groups), and it says so.
"""

from __future__ import annotations

from pathlib import Path

from spark_quant.errors import UserError
from spark_quant.yamlio import read_yaml


def read_recipe(path: Path) -> dict:
    """The recipe file as a mapping of stages; one-line errors for a missing file, bad YAML or a wrong shape."""
    data = read_yaml(path, "recipe", "see recipes/ for llm-compressor YAML recipes")
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: a recipe is a mapping of stages to modifiers (see recipes/w8a8_int8_sq_gptq.yaml)")
    return data


def check_structure(path: Path) -> int:
    """The recipe's shape: a mapping of stages, each with ``*_modifiers`` groups of named modifiers.
    Returns the number of modifiers found."""
    path = Path(path)
    data = read_recipe(path)
    found = 0
    for stage, groups in data.items():
        if not isinstance(groups, dict):
            raise UserError(f"{path}: {stage}: expected a mapping of modifier groups")
        for group, mods in groups.items():
            if group.endswith("_modifiers") and isinstance(mods, dict):
                found += len(mods)
    if not found:
        raise UserError(f"{path}: no modifiers found (expected STAGE: NAME_modifiers: Modifier: {{...}})")
    return found


def check_recipe(path: Path) -> str:
    """Check a recipe with llm-compressor: here if it is installed, else in the quantization environment's
    interpreter; structurally if neither is at hand. Returns how it was checked; raises UserError."""
    import subprocess
    import sys

    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        pass
    else:
        load_recipe(path)
        return "llm-compressor"
    check_structure(path)
    from spark_quant.serving.client import stage_python

    quant = stage_python("quant")
    if quant == sys.executable:
        return "structure only (no llm-compressor here or in .venv/quant; modifier names not checked)"
    code = ("import sys\nfrom spark_quant.errors import UserError\nfrom spark_quant.stages.recipes import load_recipe\n"
            "try:\n    load_recipe(sys.argv[1])\nexcept UserError as e:\n    print(e); sys.exit(2)\n")
    proc = subprocess.run([quant, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 2:
        raise UserError(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        return f"structure only (the quantization environment {quant} could not check it)"
    return f"llm-compressor (in {quant})"


def load_recipe(path: Path):
    """Parse a recipe with llm-compressor itself; one-line errors for bad YAML or unknown modifiers."""
    path = Path(path)
    read_recipe(path)
    from llmcompressor.recipe import Recipe

    try:
        recipe = Recipe.create_instance(str(path))
    except Exception as e:  # llm-compressor raises ValueError / pydantic errors / KeyError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: llm-compressor rejected the recipe ({msg[:300]})") from None
    if not recipe.modifiers:
        raise UserError(f"{path}: the recipe has no modifiers; add e.g. GPTQModifier under a stage")
    return recipe
