"""The package's layers, held by a short AST check over every import (module-level and inside functions).

    base      errors, yamlio, config, envinfo, artifacts, outputs, hub   (import only the base)
    spark     Spark-TTS facts, corpus readers, held-out prompts, the vocabulary permutation
    models    model folders, tokenizer, proxies, generation, the serving-profile transform
    serving   vLLM worker, plugin, step profiler, client        (runs in the serving environment)
    reporting metrics, statistics, report, comparison, card     (pure over result dicts)
    stages    calibrate, quantize, evaluate, publish, sweep
    cli       the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "spark_quant"
BASE = {"errors", "yamlio", "config", "envinfo", "artifacts", "outputs", "hub"}
# what each layer may import from spark_quant (besides itself)
ALLOWED = {
    "base": {"base"},
    "spark": {"base", "spark"},
    "models": {"base", "spark", "models"},
    "serving": {"base", "spark", "serving"},
    "audio": {"base", "spark", "serving", "reporting", "audio"},  # beside the vLLM worker, in the serving env
    "reporting": {"base", "spark", "reporting"},
    "stages": {"base", "spark", "models", "serving", "audio", "reporting", "stages"},
    "cli": {"base", "spark", "models", "serving", "audio", "reporting", "stages", "cli"},
}
# third-party packages a layer must never import: the serving environment has no llm-compressor,
# and reporting is pure (no model, no engine)
FORBIDDEN = {
    "serving": {"llmcompressor", "datasets"},
    "audio": {"llmcompressor", "datasets"},
    "spark": {"torch", "vllm", "transformers", "llmcompressor"},
    "reporting": {"torch", "vllm", "transformers", "llmcompressor"},
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "cli"  # spark_quant/__init__.py
    top = parts[1]
    if top in BASE:
        return "base"
    if top in ("cli", "__main__"):
        return "cli"
    return top


def imports_of(source: str, mod: str) -> set[str]:
    """Every module name an import statement in ``source`` names (relative imports resolved)."""
    out: set[str] = set()
    pkg = mod.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from spark_quant import spark`
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return out


def violations(source: str, mod: str, known: set[str]) -> list[str]:
    """What in ``source`` (the text of module ``mod``) breaks the layering rules."""
    me = layer_of(mod)
    bad = []
    for name in sorted(imports_of(source, mod)):
        top = name.split(".")[0]
        if top == "spark_quant":
            if name == "spark_quant" or name not in known:
                continue  # `from spark_quant.x import function`: the module itself is listed too
            if layer_of(name) not in ALLOWED[me]:
                bad.append(f"{mod} ({me}) imports {name} ({layer_of(name)})")
        elif top in FORBIDDEN.get(me, set()):
            bad.append(f"{mod} ({me}) imports {name}")
    return bad


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def test_every_module_keeps_to_its_layer():
    mods = _modules()
    known = set(mods)
    bad = [v for mod, p in mods.items() for v in violations(p.read_text(), mod, known)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_serving_module_that_imports_llm_compressor_or_a_stage():
    known = set(_modules())
    src = "import json\nfrom llmcompressor import oneshot\n\ndef f():\n    from spark_quant.stages import quantize\n"
    found = violations(src, "spark_quant.serving.worker", known)
    assert any("llmcompressor" in v for v in found) and any("spark_quant.stages" in v for v in found), found
    assert violations("from spark_quant.models.folder import llm_dir\n", "spark_quant.reporting.card", known)
    assert not violations("from spark_quant import spark\nimport vllm\n", "spark_quant.serving.worker", known)


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {m: {n for n in imports_of(p.read_text(), m) if n in mods and n not in (m, "spark_quant")}
             for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_eval_scripts_import_only_public_names():
    bad = []
    for script in sorted((ROOT / "eval").glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spark_quant"):
                bad += [f"{script.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if "sys.path.insert" in script.read_text():
            bad.append(f"{script.name}: sys.path.insert (run it with the package importable instead)")
    assert not bad, bad


def test_the_readme_file_list_names_every_module():
    """README's "Files" section is the map a newcomer reads: one line per module, none missing."""
    files = (ROOT / "README.md").read_text().split("## Files", 1)[1]
    listed = {line.split()[0] for line in files.splitlines() if line.startswith("  ") and line.split()}
    modules = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py"} - {"spark/__init__.py"}
    assert not modules - listed, f"README.md's Files section lacks: {sorted(modules - listed)}"
