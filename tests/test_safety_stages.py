"""Issue 13, the stages: stale upstream folders are refused (never "up to date"), and llm-compressor's silent
GPTQ fallback to round-to-nearest is recorded and fails the stage unless the experiment allows it.

llm-compressor runs once in this file (the module fixture: a recipe with ``dampening_frac: -1``, which makes
every Hessian inversion fail); every other case is refused before any model work, in-process, and asserts that
the project tree did not change.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli, serve_python
from safety_helpers import assert_only_changed, cli, make_project, one_line_error, tree_state

from spark_quant.config import load_experiment
from spark_quant.errors import StageFailed
from spark_quant.stages.upstream import check_degradations, degradations

pytestmark = pytest.mark.e2e

RECIPE = """quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: Linear
      scheme: W8A8
      ignore: [lm_head]
      dampening_frac: -1.0
"""
EXPERIMENT = """name: fb
model: model
recipe: recipes/damp-neg.yaml
quantize_allow_fallback: true
calibration:
  num_samples: 8
  clone_fraction: 0.0
  max_seq_length: 256
"""


@pytest.fixture(scope="module")
def fallback(tiny_proxy, module_tmp_path):
    """calibrate + quantize (the one llm-compressor run) of a recipe whose GPTQ falls back to round-to-nearest."""
    pytest.importorskip("llmcompressor")
    work = module_tmp_path
    with pytest.MonkeyPatch.context() as mp:
        proj = make_project(work, mp, model=tiny_proxy)
    (proj / "recipes/damp-neg.yaml").write_text(RECIPE)
    (proj / "experiments/fb.yaml").write_text(EXPERIMENT)
    env = {"SPARK_QUANT_DIGEST_CACHE": str(work / "digests.json")}
    run_cli("calibrate", "-e", "experiments/fb.yaml", cwd=proj, env=env)
    proc = run_cli("quantize", "-e", "experiments/fb.yaml", cwd=proj, env=env)
    return {"proj": proj, "work": work, "stdout": proc.stdout, "ckpt": proj / "checkpoints/fb"}


@pytest.fixture()
def proj(fallback, monkeypatch):
    monkeypatch.chdir(fallback["proj"])
    monkeypatch.setenv("SPARK_QUANT_DIGEST_CACHE", str(fallback["work"] / "digests.json"))
    return fallback["proj"]


def test_gptq_fallback_is_recorded_in_the_manifest_and_the_summary(fallback):
    man = json.loads((fallback["ckpt"] / "manifest.json").read_text())
    assert man["fallbacks"] and "round-to-nearest instead of GPTQ" in man["fallbacks"][0]
    assert any(w["where"].startswith("llmcompressor.modifiers.gptq") for w in man["warnings"])
    assert not [w for w in man["warnings"] if w["level"] == "METRIC"]  # GPTQ's per-layer metrics are not warnings
    assert man["inputs"]["allow_fallback"] is True
    assert "fallbacks: 1" in fallback["stdout"] and "quantize: FALLBACK (allowed by quantize_allow_fallback)" in \
        fallback["stdout"]


def test_gptq_fallback_fails_the_stage_unless_the_experiment_allows_it(fallback, proj, capsys):
    warnings = json.loads((fallback["ckpt"] / "manifest.json").read_text())["warnings"]
    assert degradations(warnings)  # what quantize checks right after oneshot, before anything is written
    strict = load_experiment(proj / "experiments/fb.yaml", ["quantize_allow_fallback=false"])
    with pytest.raises(StageFailed, match=r"damp-neg.yaml: llm-compressor did not apply the recipe as written \("
                                          r"Hessian inversion failed .*quantize_allow_fallback: true"):
        check_degradations(degradations(warnings), strict, strict.recipe)
    check_degradations(degradations(warnings), load_experiment(proj / "experiments/fb.yaml"), strict.recipe)
    if serve_python() is None:
        pytest.skip("no serving environment with vLLM: eval's check not exercised")
    os.environ.setdefault("SERVE_PYTHON", serve_python())
    before = tree_state(proj)
    rc, _, err = cli(capsys, "eval", "-e", "experiments/fb.yaml", "--set", "quantize_allow_fallback=false")
    one_line_error(rc, err, "checkpoints/fb: was made with llm-compressor fallbacks", "make quantize")
    assert_only_changed(proj, before)


def test_quantize_refuses_a_calibration_made_with_other_settings(proj, capsys):
    before = tree_state(proj)
    rc, out, err = cli(capsys, "quantize", "-e", "experiments/fb.yaml", "--set", "calibration.num_samples=64")
    one_line_error(rc, err, "calibration/runs/fb: was made with calibration.num_samples=8 (the experiment asks 64)",
                   "make calibrate")
    assert "up to date" not in out
    assert_only_changed(proj, before)


@pytest.mark.parametrize("change,needle", [
    (["--set", "recipe=recipes/w8a8_int8_gptq.yaml"], "another recipe than recipes/w8a8_int8_gptq.yaml"),
    (["--set", "calibration.seed=7"], "another calibration"),
    (["--set", "calibration.max_seq_length=512"], "calibration.max_seq_length=256 (the experiment asks 512)"),
])
def test_eval_refuses_a_checkpoint_made_from_another_recipe_or_calibration(proj, capsys, monkeypatch, change, needle):
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (eval checks it first)")
    monkeypatch.setenv("SERVE_PYTHON", py)
    before = tree_state(proj)
    rc, out, err = cli(capsys, "eval", "-e", "experiments/fb.yaml", *change)
    one_line_error(rc, err, f"checkpoints/fb: was made with {needle}", "make quantize")
    assert "up to date" not in out
    assert_only_changed(proj, before)
