"""The paired speed method's statistics and bookkeeping: pure functions, no engine."""

from __future__ import annotations

import numpy as np
import pytest

from spark_quant.errors import UserError
from spark_quant.reporting import speed_stats as stats
from spark_quant.reporting.paired import cell_stats, memory_row, streams_from_curve, trial_metrics
from spark_quant.stages.paired import parse_cell, parse_variant


def test_median_ci_brackets_the_median_and_counts_trials():
    xs = [10.0, 11.0, 9.5, 10.2, 10.8, 9.9, 10.1, 10.4]
    s = stats.median_ci(xs)
    assert s["median"] == pytest.approx(float(np.median(xs)))
    assert s["lo"] <= s["median"] <= s["hi"]
    assert s["n"] == 8
    assert stats.median_ci([1.0, 2.0])["lo"] is None  # under 3 trials: no interval


def test_clear_difference_is_faster_or_slower_by_direction():
    rng = np.random.default_rng(1)
    ref = 100 + rng.normal(0, 2, 20)
    fast = ref * 1.5 + rng.normal(0, 2, 20)
    r = stats.paired_ratio(ref, fast, higher_is_better=True)
    assert r["median"] == pytest.approx(1.5, abs=0.05)
    assert r["lo"] > 1.0 and r["n"] == 20 and r["verdict"] == "faster"
    # the same ratio of ms/token is slower
    assert stats.paired_ratio(ref, fast, higher_is_better=False)["verdict"] == "slower"


def test_same_distribution_is_no_difference():
    rng = np.random.default_rng(2)
    a, b = 50 + rng.normal(0, 3, 24), 50 + rng.normal(0, 3, 24)
    r = stats.paired_ratio(a, b, higher_is_better=True)
    assert r["lo"] <= 1.0 <= r["hi"]
    assert r["verdict"] == "no difference"


def test_pairing_cancels_drift_that_an_unpaired_ratio_cannot():
    """Both variants drift together across rounds (a machine getting slower); B is 3% faster in every round."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    drift = np.linspace(80, 120, 20)
    a = drift * (1 + rng.normal(0, 0.005, 20))
    b = drift * 1.03 * (1 + rng.normal(0, 0.005, 20))
    paired = stats.paired_ratio(a, b, higher_is_better=True)
    unpaired = bootstrap((a, b), lambda x, y: np.median(y) / np.median(x), paired=False, vectorized=False,
                         n_resamples=2000, random_state=np.random.default_rng(0)).confidence_interval
    assert paired["verdict"] == "faster" and paired["lo"] > 1.0
    assert unpaired.low < 1.0 < unpaired.high  # the unpaired interval cannot tell
    assert paired["hi"] - paired["lo"] < (unpaired.high - unpaired.low) / 5


def test_paired_ratio_input_checks():
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_ratio([1, 2, 3], [1, 2], True)
    r = stats.paired_ratio([1.0, None, 2.0, 3.0], [1.1, 5.0, None, 3.3], True)
    assert r["n"] == 2 and r["verdict"] == "too few trials"
    assert stats.paired_ratio([2.0] * 5, [2.0] * 5, True)["verdict"] == "no difference"  # all equal


def test_two_machine_agreement():
    a = {"median": 1.00, "lo": 0.97, "hi": 1.03}
    assert stats.intervals_agree(a, {"median": 1.02, "lo": 0.99, "hi": 1.05}) == \
        {"inside_each_other": True, "relative_difference": pytest.approx(0.02), "within": True}
    far = stats.intervals_agree(a, {"median": 1.10, "lo": 1.08, "hi": 1.12})
    assert far["inside_each_other"] is False and far["within"] is False


def test_parse_variant_and_cell():
    v = parse_variant('w8a8=ck/LLM::{"replicas": 3, "executor": "mp", "enforce_eager": true}')
    assert v["topology"] == {"replicas": 3, "executor": "mp"} and v["engine"] == {"enforce_eager": True}
    assert parse_cell("b1=1:200:bf16,w8a8:greedy") == {"name": "b1", "concurrency": 1, "tokens": 200,
                                                       "labels": ["bf16", "w8a8"], "greedy": True}
    for bad in ("x=1:2", "x=a:2:l", "x=0:20:l", "x=1:20:l:fast"):
        with pytest.raises(UserError, match="--cell"):
            parse_cell(bad)
    for bad in ("nolabel", "a=p::{not json", "a=p::[1]"):
        with pytest.raises(UserError, match="--variant"):
            parse_variant(bad)


def _load(c, n, wall, total=None):
    return {"concurrency": c, "wall_s": wall, "output_tokens": c * n,
            "requests": [{"ttft": 0.01, "first_audio": 0.2, "total": total or wall, "n": n} for _ in range(c)]}


def test_trial_metrics_and_cell_stats():
    m = trial_metrics(_load(1, 101, 0.51, total=0.51))
    assert m["ms_per_token"] == pytest.approx(5.0)  # (0.51 - 0.01) / 100 tokens
    assert trial_metrics(_load(4, 100, 2.0))["tokens_per_s"] == pytest.approx(200.0)
    raw = [{"trials": {"a": {"tokens_per_s": 100.0 + i}, "b": {"tokens_per_s": 120.0 + i}}} for i in range(10)]
    st = cell_stats({"concurrency": 64, "labels": ["a", "b"], "raw": raw})
    assert st["metric"] == "tokens_per_s" and st["variants"]["a"]["n"] == 10
    (r,) = st["ratios"]
    assert (r["of"], r["to"], r["verdict"]) == ("b", "a", "faster") and r["median"] > 1.15


def test_streams_is_the_highest_concurrency_under_real_time():
    def level(c, total):  # 100 tokens = 2 s of audio
        return {"concurrency": c, "trials": [{"v": {"tokens_per_s": 1000.0, "requests":
                                                    [{"ttft": 0.1, "first_audio": 0.5, "total": total, "n": 100}] * 10}}]}
    s = streams_from_curve([level(16, 0.5), level(64, 1.9), level(256, 2.5)], "v")
    assert s["concurrency"] == 64 and s["rtf_p99"] == pytest.approx(0.95)
    assert s["first_audio_p99_s"] == pytest.approx(0.5)
    assert streams_from_curve([level(16, 3.0)], "v")["concurrency"] is None


def test_memory_row_counts_streams_in_a_budget():
    eng = [{"weights_gib": 1.0, "kv_cache_gib": 12.0, "kv_cache_tokens": 12 * 2**30 // 12288}]
    row = memory_row(eng, share=0.1, gpu_gib=140.0, budget_gib=20.0, stream_tokens=620)
    assert row["kv_bytes_per_token"] == pytest.approx(12288, rel=1e-6)
    assert row["other_gib"] == pytest.approx(1.0)  # 14 GiB share - 1 weights - 12 KV
    assert row["streams_at_budget"] == (18 * 2**30 // (624 * 12288))  # 624: whole 16-token blocks


def test_variant_topology_beats_the_experiments(tmp_path):
    from conftest import ROOT

    from spark_quant.config import load_experiment
    from spark_quant.stages.paired import variant_spec

    exp = load_experiment(ROOT / "experiments/spark-tts_w8a8_int8.yaml", ["eval.executor_backend=mp", "eval.replicas=3"])
    (tmp_path / "config.json").write_text("{}")
    mp = variant_spec(exp, parse_variant(f"a={tmp_path}"), 0.1)
    assert mp["engine_overrides"]["distributed_executor_backend"] == "mp"
    single = variant_spec(exp, parse_variant(f'a={tmp_path}::{{"replicas": 1, "executor": "default", '
                                             f'"max_num_seqs": 64, "env": {{"X": "1"}}}}'), 0.1)
    assert "distributed_executor_backend" not in single["engine_overrides"]
    assert single["max_num_seqs"] == 64 and single["env"]["X"] == "1"
    # any other key is a vLLM engine argument, passed as given (gpu15's w8a8t-x3mp: the Triton INT8 GEMM)
    triton = variant_spec(exp, parse_variant(f'a={tmp_path}::{{"replicas": 3, "linear_backend": "triton"}}'), 0.1)
    assert triton["engine_overrides"]["linear_backend"] == "triton"


def test_the_committed_h200_run_recomputes_from_its_raw_trials():
    """docs/results/h200-paired: every cell's statistics follow from its raw trials (seeded bootstrap)."""
    import gzip
    import json

    from conftest import ROOT

    from spark_quant.reporting.paired import render_markdown

    res = json.loads(gzip.decompress((ROOT / "docs/results/h200-paired/paired.json.gz").read_bytes()))
    for cell in res["cells"].values():
        assert len(cell["raw"]) == 20
        assert cell_stats(cell) == cell["stats"]
    md = render_markdown(res)
    assert "| w8a8-x3mp / bf16-x3mp | 0.948 [0.933, 0.960] (n=20) | slower |" in md
    assert md == (ROOT / "docs/results/h200-paired/paired.md").read_text()
