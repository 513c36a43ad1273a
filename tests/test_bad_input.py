"""Bad input: one line naming the file or field and what to do, non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, run_cli, run_inprocess

from spark_quant.errors import UserError


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("spark-quant: error: ") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture()
def recipe_dir(tmp_path):
    return tmp_path


def test_malformed_recipe_yaml_names_the_file_and_line(recipe_dir):
    pytest.importorskip("llmcompressor")
    from spark_quant.stages.recipes import load_recipe

    bad = recipe_dir / "bad.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W8A8\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_recipe(bad)


def test_unknown_modifier_is_rejected_by_llm_compressor(recipe_dir):
    pytest.importorskip("llmcompressor")
    from spark_quant.stages.recipes import load_recipe

    bad = recipe_dir / "unknown.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    SuperQuantModifier:\n      bits: 3\n")
    with pytest.raises(UserError, match="unknown.yaml: llm-compressor rejected the recipe"):
        load_recipe(bad)


def test_unknown_modifier_is_caught_without_llm_compressor_too(recipe_dir):
    """The serving environment has no llm-compressor: validate there asks the quantization environment, so the
    names are llm-compressor's own (no hand-copied list)."""
    from conftest import serve_python

    from spark_quant.stages.recipes import check_structure

    bad = recipe_dir / "unknown.yaml"
    bad.write_text("quant_stage:\n  quant_modifiers:\n    SuperQuantModifier:\n      bits: 3\n")
    assert check_structure(bad) == 1 and check_structure(ROOT / "recipes/w8a8_int8_sq_gptq.yaml") == 2
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment")
    proc = run_cli("validate", str(bad), str(ROOT / "recipes/w8a8_int8_sq_gptq.yaml"), python=py, check=False)
    assert proc.returncode == 1
    assert "BAD " in proc.stdout and "unknown.yaml: llm-compressor rejected the recipe" in proc.stdout
    assert "ok  " + str(ROOT / "recipes/w8a8_int8_sq_gptq.yaml") in proc.stdout


def test_quantize_with_bad_recipe_exits_before_touching_outputs(tmp_path, tiny_proxy):
    pytest.importorskip("llmcompressor")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant_stage: [\n")
    proc = run_inprocess("quantize", "--model", str(tiny_proxy), "--recipe", str(bad),
                         "--calibration", str(tmp_path / "cal"),
                   "--out", str(tmp_path / "out"), check=False)
    _one_line_error(proc, str(bad), "not valid YAML")
    assert not (tmp_path / "out").exists()


def test_quantize_without_calibration_says_which_stage_to_run(tmp_path, tiny_proxy):
    pytest.importorskip("llmcompressor")
    proc = run_inprocess("quantize", "--model", str(tiny_proxy), "--calibration", str(tmp_path / "nocal"),
                   "--out", str(tmp_path / "out"), check=False)
    _one_line_error(proc, str(tmp_path / "nocal"), "make calibrate")


def test_model_folder_without_llm_subfolder(tmp_path):
    (tmp_path / "model").mkdir()
    proc = run_inprocess("calibrate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "c"), check=False)
    _one_line_error(proc, "no LLM/config.json")


def test_not_a_qwen2_model(tmp_path, tiny_proxy):
    model = tmp_path / "model"
    shutil.copytree(tiny_proxy, model)
    cfg = json.loads((model / "LLM/config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (model / "LLM/config.json").write_text(json.dumps(cfg))
    proc = run_inprocess("calibrate", "--model", str(model), "--out", str(tmp_path / "c"), check=False)
    _one_line_error(proc, "config.json", "not a Qwen2ForCausalLM")


def test_vocab_size_disagreeing_with_the_embedding(tmp_path, tiny_proxy):
    model = tmp_path / "model"
    shutil.copytree(tiny_proxy, model)
    cfg = json.loads((model / "LLM/config.json").read_text())
    cfg["vocab_size"] = 170000
    (model / "LLM/config.json").write_text(json.dumps(cfg))
    proc = run_inprocess("calibrate", "--model", str(model), "--out", str(tmp_path / "c"), check=False)
    _one_line_error(proc, "vocab_size 170000 disagrees with the embedding's 166000 rows")


def test_tokenizer_without_spark_tokens_is_refused(tmp_path, tiny_proxy):
    model = tmp_path / "model"
    shutil.copytree(tiny_proxy, model)
    # a plain Qwen2.5 tokenizer: same BPE, none of the 13,493 Spark tokens
    tc = json.loads((model / "LLM/tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < 151665}
    (model / "LLM/tokenizer_config.json").write_text(json.dumps(tc))
    tj = json.loads((model / "LLM/tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < 151665]
    (model / "LLM/tokenizer.json").write_text(json.dumps(tj))
    proc = run_inprocess("calibrate", "--model", str(model), "--out", str(tmp_path / "c"),
                   "--set", "calibration.num_samples=2", check=False)
    _one_line_error(proc, "tokenizer is not Spark-TTS's", "<|bicodec_global_0|> is missing")
    assert not (tmp_path / "c").exists()


def test_empty_and_non_utf8_corpus(tmp_path, tiny_proxy):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    proc = run_inprocess("calibrate", "--model", str(tiny_proxy), "--out", str(tmp_path / "c"),
                   "--set", f"calibration.corpus={empty}", check=False)
    _one_line_error(proc, str(empty), "corpus is empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    proc = run_inprocess("calibrate", "--model", str(tiny_proxy), "--out", str(tmp_path / "c"),
                   "--set", f"calibration.corpus={latin}", check=False)
    _one_line_error(proc, str(latin), "line 2 is not UTF-8")


def test_bad_reference_file_names_the_line(tmp_path, tiny_proxy):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"global": list(range(32)), "semantic": [1, 2]}) + "\n"
                    + json.dumps({"global": list(range(30))}) + "\n")
    proc = run_inprocess("calibrate", "--model", str(tiny_proxy), "--out", str(tmp_path / "c"),
                   "--set", f"calibration.references={refs}", check=False)
    _one_line_error(proc, str(refs), "line 2", "exactly 32 global tokens")


def test_existing_unrelated_folder_is_never_replaced(tmp_path, tiny_proxy):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for flags in ([], ["--overwrite"]):  # whatever flag is passed
        proc = run_inprocess("calibrate", "--model", str(tiny_proxy), "--out", str(out), *flags, check=False)
        _one_line_error(proc, "not a folder spark-quant made", "refusing to replace it")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "precious"


def test_validate_command_checks_every_shipped_file_and_flags_bad_ones(tmp_path):
    proc = run_inprocess("validate", *[str(p) for p in sorted((ROOT / "experiments").glob("*.yaml"))],
                   *[str(p) for p in sorted((ROOT / "recipes").glob("*.yaml"))])
    assert proc.stdout.count("ok  ") == len(list((ROOT / "experiments").glob("*.yaml"))) + len(
        list((ROOT / "recipes").glob("*.yaml")))
    bad = tmp_path / "exp.yaml"
    bad.write_text("eval:\n  concurrency: [0]\n")
    proc = run_inprocess("validate", str(bad), check=False)
    assert proc.returncode == 1 and "eval.concurrency" in proc.stdout
