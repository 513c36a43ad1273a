"""Eval metrics and verdicts on synthetic worker results (no vLLM needed)."""

from __future__ import annotations

import math

import pytest

from spark_quant import spark
from spark_quant.config import load_experiment
from spark_quant.reporting.metrics import (
    greedy_similarity,
    latency_metrics,
    max_concurrency_under,
    teacher_forced,
    throughput_metrics,
)
from spark_quant.serving.client import run_worker
from spark_quant.stages.evaluate import build_results


def test_latency_metrics_from_stream_stamps():
    # 5 tokens, first after 10 ms, then one every 2 ms
    stamps = [[0.010, 1], [0.012, 2], [0.014, 3], [0.016, 4], [0.018, 5]]
    m = latency_metrics({"requests": [{"stamps": stamps, "mode": "clone", "time_to_first_audio": None}]})
    assert m["ttft_s"]["p50"] == pytest.approx(0.010)
    assert m["ms_per_token"]["p50"] == pytest.approx(2.0)
    assert m["itl_ms"]["p50"] == pytest.approx(2.0)
    assert m["rtf"]["p50"] == pytest.approx(0.018 / (5 / 50))
    assert m["first_audio_by_mode_s"]["clone"] == {"p50": None, "reached": 0, "requests": 1}


def test_throughput_rows_and_max_concurrency_under_target():
    task = {"rows": [{"concurrency": c, "wall_s": 2.0, "output_tokens": 100 * c,
                      "requests": [{"ttft": 0.1, "total": 2.0 * c / 4, "n": 100, "semantic": 0}] * c}
                     for c in (1, 4, 16)]}
    rows = throughput_metrics(task)
    assert [r["tokens_per_s"] for r in rows] == [50, 200, 800]
    assert rows[0]["rtf_p99"] == pytest.approx(0.25) and rows[2]["rtf_p99"] == pytest.approx(4.0)
    assert max_concurrency_under(rows, 1.5) == 4
    assert max_concurrency_under(rows, 0.1) is None


def test_greedy_similarity_counts_prefix_exact_and_globals():
    g = [spark.global_id(i) for i in range(32)]
    base = [{"tokens": g + [1, 2, 3]}, {"tokens": [5, 6, 7, 8]}]
    quant = [{"tokens": g[:16] + [spark.global_id(99)] * 16 + [1, 2, 3]}, {"tokens": [5, 6, 7, 8]}]
    prompts = [{"mode": "controllable"}, {"mode": "clone"}]
    s = greedy_similarity(base, quant, prompts)
    assert s["prefix_agreement_mean"] == pytest.approx((16 / 35 + 1.0) / 2)
    assert s["exact_match_rate"] == 0.5
    assert s["global_token_agreement"] == pytest.approx(0.5)
    assert s["agreement_by_position"][2] == 1.0 and s["agreement_by_position"][20] == 0.0


def test_teacher_forced_kl_is_zero_for_identical_and_positive_for_shifted():
    lp = {"10": math.log(0.7), "11": math.log(0.2), "12": math.log(0.05)}
    same = teacher_forced([[lp]], [[lp]], [[10]])
    assert same["top1_agreement"] == 1.0 and same["kl_base_quant_mean"] == pytest.approx(0.0, abs=1e-12)
    assert same["nll_delta_mean"] == pytest.approx(0.0)
    shifted = {"10": math.log(0.3), "11": math.log(0.6), "12": math.log(0.05)}
    diff = teacher_forced([[lp]], [[shifted]], [[10]])
    assert diff["top1_agreement"] == 0.0 and diff["kl_base_quant_mean"] > 0.1
    assert diff["nll_delta_mean"] == pytest.approx(math.log(0.7) - math.log(0.3))


def _run(kernels, greedy_tokens, ok=True):
    stamps = [[0.01, 1], [0.02, 2], [0.03, 3]]
    lat = {"requests": [{"stamps": stamps, "mode": "clone", "time_to_first_audio": None}]}
    thr = {"rows": [{"concurrency": 1, "wall_s": 1.0, "output_tokens": 3,
                     "requests": [{"ttft": 0.01, "total": 0.03, "n": 3, "semantic": 0}]}]}
    outs = {"outputs": [{"tokens": t, "finish": "length"} for t in greedy_tokens]}
    pos = [[{str(t): 0.0} for t in toks] for toks in greedy_tokens]
    return {"ok": ok, "kernels": kernels, "wall_s": 1.0, "error": None if ok else "boom",
            "engine": {"dtype": "bfloat16", "quantization": None},
            "tasks": {"latency": lat, "latency_greedy": lat, "throughput": thr, "greedy": outs, "sampled": outs,
                      "score": {"positions": pos}, "score_self": {"positions": pos}}}


QMAN = {"check": {"format": "int-quantized", "weights": {"total_bytes": 10, "embedding_and_head_bytes": 5,
                                                           "bytes_by_dtype": {"I8": 5, "BF16": 5}}},
        "source_weights": {"total_bytes": 20, "embedding_and_head_bytes": 10, "bytes_by_dtype": {"BF16": 20}},
        "inputs": {"recipe_path": "recipes/x.yaml"}}
CFG = {"num_hidden_layers": 2, "num_key_value_heads": 1, "hidden_size": 64, "num_attention_heads": 1}
PROMPTS = [{"mode": "clone", "text": "a", "ids": [1, 2]}]


def test_verdict_fails_on_the_wrong_kernel_and_names_it():
    exp = load_experiment(None)
    good = "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
    res = build_results(exp, PROMPTS, {"baseline": [_run([], [[1, 2]])], "quantized": [_run([good], [[1, 2]])]},
                        QMAN, "cpu", CFG)
    assert res["verdict"]["status"] == "PASS" and res["verdict"]["passed"] and res["verdict"]["failures"] == []
    bad = "SomeOtherKernel for CompressedTensorsW8A8Int8"
    res = build_results(exp, PROMPTS, {"baseline": [_run([], [[1, 2]])], "quantized": [_run([bad], [[1, 2]])]},
                        QMAN, "cpu", CFG)
    assert not res["verdict"]["passed"]
    assert "expected CPUInt8ScaledMMLinearKernel" in res["verdict"]["failures"][0]


def test_verdict_fails_when_the_whole_interval_misses_a_threshold_in_the_experiment():
    exp = load_experiment(None, ["eval.min_greedy_prefix_agreement=0.9"])
    k = ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    prompts = PROMPTS * 8
    res = build_results(exp, prompts, {"baseline": [_run([], [[1, 2, 3, 4]] * 8)],
                                       "quantized": [_run(k, [[1, 9, 9, 9]] * 8)]}, QMAN, "cpu", CFG)
    assert res["verdict"]["status"] == "FAIL" and not res["verdict"]["passed"]
    gate = next(g for g in res["verdict"]["gates"] if g["gate"] == "min_greedy_prefix_agreement")
    assert gate["interval"]["high"] < 0.9 and gate["interval"]["n"] == 8
    assert "eval.min_greedy_prefix_agreement >= 0.9" in res["verdict"]["failures"][0]


def test_an_interval_that_holds_the_threshold_is_inconclusive_and_says_how_many_more_prompts():
    exp = load_experiment(None, ["eval.min_greedy_prefix_agreement=0.9"])
    k = ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    prompts = PROMPTS * 8
    quant = [[1, 2, 3, 4], [1, 2, 3, 9]] * 4  # prefix agreement 1.0 and 0.75: mean 0.875, interval around 0.9
    res = build_results(exp, prompts, {"baseline": [_run([], [[1, 2, 3, 4]] * 8)], "quantized": [_run(k, quant)]},
                        QMAN, "cpu", CFG)
    v = res["verdict"]
    assert v["status"] == "INCONCLUSIVE" and not v["passed"] and v["failures"] == []
    gate = next(g for g in v["gates"] if g["gate"] == "min_greedy_prefix_agreement")
    assert gate["interval"]["low"] < 0.9 < gate["interval"]["high"] and gate["more_units"] > 0
    assert f"about {gate['more_units']} more prompts would decide it" in v["inconclusive"][0]
    assert res["fidelity"]["greedy_prefix"]["value"] == pytest.approx(0.875)
    assert res["fidelity"]["per_prompt"]["greedy_prefix"]["sum"] == [1.0, 0.75] * 4


def test_a_crashed_worker_is_a_failed_row_not_a_crash():
    exp = load_experiment(None)
    k = ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    res = build_results(exp, PROMPTS, {"baseline": [_run([], [[1]])], "quantized": [_run(k, [[1]], ok=False)]},
                        QMAN, "cpu", CFG)
    assert not res["verdict"]["passed"] and "quantized vLLM run failed: boom" in res["verdict"]["failures"][0]
    assert "quantized" not in res["speed"]



def _fake_worker(tmp_path, monkeypatch, body: str, name: str = "fake.sh") -> None:
    """A shell script in place of the serving interpreter: it gets `-m MODULE SPEC RESULT` ($1..$4)."""
    fake = tmp_path / name
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    monkeypatch.setenv("SERVE_PYTHON", str(fake))


def test_run_worker_turns_a_startup_failure_into_an_error(tmp_path, monkeypatch):
    # an interpreter that exits at once stands in for a worker that dies (no result file written)
    monkeypatch.setenv("SERVE_PYTHON", "/bin/false")
    res = run_worker({"model": str(tmp_path), "dtype": "bfloat16", "tasks": []}, tmp_path, "t", timeout_s=30)
    assert res["ok"] is False and "exited with 1" in res["error"]


def test_run_worker_kills_a_hung_worker_at_the_timeout(tmp_path, monkeypatch):
    _fake_worker(tmp_path, monkeypatch, "sleep 60\n", "hang.sh")
    res = run_worker({"model": str(tmp_path), "dtype": "bfloat16", "tasks": []}, tmp_path, "t", timeout_s=2)
    assert res["ok"] is False and "timed out after 2s" in res["error"]


def test_a_failed_worker_reports_vllms_root_cause_not_the_last_line(tmp_path, monkeypatch):
    # vLLM logs the cause in the engine process, then generic wrappers; the row must carry the cause
    _fake_worker(tmp_path, monkeypatch,
                 "echo '(Worker pid=1) ERROR 11-27 [multiproc_executor.py:953] ValueError: Failed to find a kernel "
                 "that can implement the WNA16 linear layer. Reasons: '\n"
                 "echo 'Exception: WorkerProc initialization failed due to an exception in a background process.'\n"
                 "echo 'RuntimeError: Engine core initialization failed. See root cause above.'\n"
                 "exit 1\n")
    res = run_worker({"model": str(tmp_path), "dtype": "bfloat16", "tasks": []}, tmp_path, "t", timeout_s=30)
    assert res["ok"] is False
    assert res["error"].startswith("vLLM worker exited with 1: ValueError: Failed to find a kernel")


def test_out_of_memory_is_named_for_gpu_and_cpu_messages(tmp_path, monkeypatch):
    for line in ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                 "ValueError: No available memory for the cache blocks. Try increasing gpu_memory_utilization",
                 "ValueError: Available memory on node 0 (1/23 GiB) on kv cache allocation is less than requested "
                 "memory for kv (-0.8/0.02 GiB)."):
        _fake_worker(tmp_path, monkeypatch, f"echo '{line}'\nexit 1\n", "oom.sh")
        res = run_worker({"model": str(tmp_path), "dtype": "bfloat16", "tasks": []}, tmp_path, "t", timeout_s=30)
        assert "(out of memory)" in res["error"], line


def test_fp8_on_a_gpu_without_fp8_is_a_skipped_row_that_says_why(tmp_path):
    from spark_quant.stages.evaluate import write_skipped
    from spark_quant.stages.sweep import row_for

    exp = load_experiment(None)
    qman = {"check": {"format": "float-quantized", "weights": {"total_bytes": 10}},
            "inputs": {"recipe_path": "recipes/fp8_dynamic.yaml"}}
    out = write_skipped(exp, tmp_path / "fp8", False, False, "FP8 checkpoint and GPU compute capability 8.0",
                        {"k": 1}, qman)
    row = row_for(out)
    assert row["verdict"] == "skipped: FP8 checkpoint and GPU compute capability 8.0" and row["recipe"] == "fp8_dynamic"
    assert (out / "manifest.json").is_file() and "Not evaluated" in (out / "report.md").read_text()


def test_set_without_equals_is_one_line():
    from spark_quant.config import parse_override
    from spark_quant.errors import UserError

    with pytest.raises(UserError, match="expected FIELD=VALUE"):
        parse_override("calibration.num_samples")


def test_a_worker_that_reports_vllms_wrapper_error_gets_the_root_cause_and_oom(tmp_path, monkeypatch):
    # serve_worker catches vLLM's "Engine core initialization failed" and writes it as its result;
    # the row must carry the cause vLLM logged before it (here: no memory left for the KV cache)
    _fake_worker(tmp_path, monkeypatch,
                 "echo '(Worker pid=5) ERROR [cpu_worker.py:241] ValueError: Available memory on node 0 (20/23 GiB) "
                 "on kv cache allocation is less than requested memory for kv (-0.83/0.02 GiB).'\n"
                 "echo '{\"ok\": false, \"error\": \"RuntimeError: Engine core initialization failed. See root cause "
                 "above.\"}' > \"$4\"\n")
    res = run_worker({"model": str(tmp_path), "dtype": "bfloat16", "tasks": []}, tmp_path, "t", timeout_s=30)
    assert res["ok"] is False
    assert res["error"].startswith("vLLM worker failed (out of memory): ValueError: Available memory on node 0")


def test_engine_env_reaches_the_worker_and_the_start_is_timed(tmp_path, monkeypatch):
    # eval.engine_env -> the worker's environment; the engine-start lines of its log -> res["startup"]
    from spark_quant.serving.client import worker_spec

    exp = load_experiment(None, ["eval.engine_env={VLLM_USE_V2_MODEL_RUNNER: '0'}"])
    spec = worker_spec(exp, tmp_path, "bfloat16")
    assert spec["env"] == {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    _fake_worker(tmp_path, monkeypatch,
                 "echo 'INFO [model_runner.py:305] Model loading took 0.95 GiB and 2.939693 seconds'\n"
                 "echo 'INFO [model_runner.py:747] Graph capturing finished in 2 secs, took 0.18 GiB'\n"
                 "echo 'INFO [core.py:340] init engine (profile, create kv cache, warmup model) took 47.60 s "
                 "(compilation: 23.49 s)'\n"
                 "echo \"{\\\"ok\\\": true, \\\"v2\\\": \\\"$VLLM_USE_V2_MODEL_RUNNER\\\"}\" > \"$4\"\n")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    res = run_worker({**spec, "tasks": []}, tmp_path, "t", timeout_s=30)
    assert res["ok"] and res["v2"] == "0"
    assert res["startup"] == {"load_s": 2.939693, "engine_init_s": 47.6, "compile_s": 23.49, "graph_capture_s": 2.0}


def test_compact_cuda_graph_sizes_cover_every_measured_concurrency():
    from spark_quant.serving.client import compact_capture_sizes

    sizes = compact_capture_sizes([1, 4, 16, 64, 200])
    assert set([1, 4, 16, 64, 200]) <= set(sizes) and max(sizes) == 200 and sizes == sorted(set(sizes))
    assert len(sizes) < 20  # vLLM's default captures ~67 sizes up to 512
    assert compact_capture_sizes([1]) == [1]


def test_speed_matrix_rows_give_ratios_against_the_first_variant_and_name_failures():
    from spark_quant.reporting.report import render_speed_matrix

    def summ(ms, tps):
        return {"ms_per_token_sampled": ms, "ms_per_token_sampled_runs": [ms, ms + 0.1], "ms_per_token_greedy": ms - 0.2,
                "weights_gib_loaded": 0.95, "throughput": [{"concurrency": 1, "tokens_per_s": 400},
                                                           {"concurrency": 256, "tokens_per_s": tps}]}
    lines = render_speed_matrix({"bf16": summ(2.0, 40000), "w8a8": summ(2.5, 30000), "bad": {"error": "boom"}}, [1, 256])
    assert lines[0].startswith("| variant | weights GiB |") and lines[0].endswith("| tok/s c=256 ratio |")
    assert lines[2] == "| bf16 | 0.95 | 2.000 | 2.000/2.100 | 1.800 | 400 | 40000 | 1.00 |"
    assert lines[3].endswith("| 400 | 30000 | 0.75 |")
    assert lines[4].startswith("| bad | failed: boom |")


def test_batch1_ms_per_token_carries_an_interval_over_the_requests_of_every_repeat():
    from spark_quant.reporting.metrics import _pooled_ci
    from spark_quant.reporting.speed_text import b1_interval_lines as _b1_intervals

    def task(step_ms: list[float]) -> dict:  # one request per step, 20 tokens each
        return {"requests": [{"stamps": [[0.01 + i * s / 1000, i + 1] for i in range(20)], "mode": "clone"}
                             for s in step_ms]}

    reps = [latency_metrics(task([2.0, 2.1, 1.9, 2.0])), latency_metrics(task([2.2, 2.0, 2.1, 1.8]))]
    assert reps[0]["ms_per_token_samples"] == pytest.approx([2.0, 2.1, 1.9, 2.0])
    ci = _pooled_ci(reps)
    assert ci["n"] == 8 and ci["median"] == pytest.approx(2.0) and ci["lo"] <= 2.0 <= ci["hi"] and ci["hi"] <= 2.2
    one = _pooled_ci([latency_metrics(task([2.0, 2.1]))])
    assert one["n"] == 2 and one["lo"] is None  # no interval under 3 requests, and the report says so
    lines = _b1_intervals({"baseline": {"ms_per_token_sampled_ci": ci, "ms_per_token_greedy_ci": one},
                           "quantized": {"ms_per_token_sampled_ci": ci}})
    text = "\n".join(lines)
    assert f"| ms/token, sampled | 2.000 [{ci['lo']:.3f}, {ci['hi']:.3f}], n = 8 |" in text
    assert "| ms/token, greedy | 2.050 (no interval under 3 requests), n = 2 | – |" in text
    assert "ranks nothing" in text and _b1_intervals({"baseline": {}, "quantized": {}}) == []


def test_three_repeats_give_the_evals_own_ratios_a_paired_interval_in_results_report_and_comparison(tmp_path):
    from test_publish import _worker_run  # one worker result in serve_worker's shape

    from spark_quant.reporting.compare import render_table, row_from_results
    from spark_quant.reporting.report import render_report

    good = [spark.global_id(i) for i in range(32)] + [spark.semantic_id(i) for i in range(40)] + [spark.EOS_ID]

    def run(wall_scale: float, kernels: list[str]) -> dict:
        r = _worker_run(kernels, [good, good])
        for row in r["tasks"]["throughput"]["rows"]:
            row["wall_s"] *= wall_scale
        return r

    drift = (1.0, 1.3, 0.9)  # moves both runs of a repeat together; the quantized run takes 0.78-0.82 of the time
    runs = {"baseline": [run(d, []) for d in drift],
            "quantized": [run(d * f, ["K"]) for d, f in zip(drift, (0.80, 0.82, 0.78))]}
    qman = {"check": {"format": "int-quantized", "weights": {"total_bytes": 1000, "embedding_and_head_bytes": 100}},
            "inputs": {"recipe_path": "recipes/w8a8_int8_sq_gptq.yaml"}}
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": spark.VOCAB_SIZE,
           "num_attention_heads": 4, "num_key_value_heads": 2}
    prompts = [{"mode": "controllable", "text": "a", "ids": [1, 2, 3]}, {"mode": "clone", "text": "b", "ids": [4, 5]}]
    res = build_results(load_experiment(None), prompts, runs, qman, "cpu", cfg)
    c4 = res["ratios"]["by_repeat"]["tokens_per_s"][4]
    assert c4["n"] == 3 and c4["median"] == pytest.approx(1 / 0.80) and c4["verdict"] == "faster"
    assert 1 / 0.82 - 1e-9 <= c4["lo"] <= c4["median"] <= c4["hi"] <= 1 / 0.78 + 1e-9
    line = next(x for x in render_report(res).splitlines() if x.startswith("| 4 |"))
    assert f"| {c4['median']:.3f} [{c4['lo']:.3f}, {c4['hi']:.3f}] (n = 3 repeats) |" in line
    res["experiment"] = "spark-tts_w8a8_int8"
    table = render_table([row_from_results(res, None, tmp_path)])
    row = next(x for x in table.splitlines() if x.startswith("| spark-tts_w8a8_int8 |"))
    assert f"{c4['median']:.3f} [{c4['lo']:.3f}, {c4['hi']:.3f}] n=3 runs" in row

    one = build_results(load_experiment(None), prompts, {k: v[:1] for k, v in runs.items()}, qman, "cpu", cfg)
    assert one["ratios"]["by_repeat"]["tokens_per_s"][4]["lo"] is None  # one repeat: the plain ratio, no interval
    line = next(x for x in render_report(one).splitlines() if x.startswith("| 4 |"))
    assert "| 1.25 |" in line and "repeats" not in line
