"""Confidence intervals (scipy bootstrap, statsmodels Wilson), interval-decided gates and the metric table."""

from __future__ import annotations

import math
import random

import pytest

from spark_quant.reporting import gates, stats
from spark_quant.reporting.metrics import METRICS, fidelity, sampled_quality


def test_wilson_interval_matches_the_textbook_value_and_keeps_n():
    ci = stats.rate_ci(8, 12)
    assert ci["value"] == pytest.approx(2 / 3) and ci["n"] == 12 and ci["k"] == 8
    assert ci["low"] == pytest.approx(0.3906, abs=1e-3) and ci["high"] == pytest.approx(0.8619, abs=1e-3)
    assert stats.rate_ci(0, 0)["value"] is None


def test_bootstrap_interval_holds_the_mean_and_narrows_with_n():
    rng = random.Random(0)
    small = stats.mean_ci([rng.gauss(1.0, 1.0) for _ in range(20)])
    large = stats.mean_ci([rng.gauss(1.0, 1.0) for _ in range(500)])
    assert small["low"] < small["value"] < small["high"] and small["n"] == 20
    assert (large["high"] - large["low"]) < 0.5 * (small["high"] - small["low"])
    assert stats.mean_ci([0.5])["low"] is None  # one unit: no interval


def test_pooled_mean_resamples_prompts_not_positions():
    ci = stats.pooled_mean_ci([9, 1, 9, 1], [10, 10, 10, 10])
    assert ci["value"] == pytest.approx(0.5) and ci["n"] == 4 and ci["low"] < 0.5 < ci["high"]


def test_paired_difference_sees_a_shift_that_unpaired_intervals_cannot():
    rng = random.Random(1)
    base = [rng.gauss(0, 1) for _ in range(40)]
    quant = [b + 0.1 + rng.gauss(0, 0.02) for b in base]  # a small shift, identical per-prompt noise
    diff = stats.paired_ci(base, quant, "diff")
    assert diff["low"] > 0 and diff["value"] == pytest.approx(0.1, abs=0.02)
    assert stats.overlap(stats.mean_ci(base), stats.mean_ci(quant))  # the separate intervals overlap
    ratio = stats.paired_ci([1, 1, 1, 1], [1, 1, 1, 0], "ratio")
    assert ratio["value"] == pytest.approx(0.75)


def test_gate_decides_on_the_whole_interval():
    ci = {"value": 0.95, "low": 0.93, "high": 0.97, "n": 100}
    assert gates.decide(ci, 0.9, True) == "PASS" and gates.decide(ci, 0.99, True) == "FAIL"
    assert gates.decide(ci, 0.95, True) == "INCONCLUSIVE"
    assert gates.decide(ci, 0.99, False) == "PASS" and gates.decide(ci, 0.9, False) == "FAIL"
    # no interval: the metric's whole range, so only a threshold it cannot miss passes
    assert gates.decide({"value": 0.5, "low": None, "high": None}, 0.0, True, (0.0, 1.0)) == "PASS"
    assert gates.decide({"value": 0.5, "low": None, "high": None}, 0.4, True, (0.0, 1.0)) == "INCONCLUSIVE"


def test_tolerance_gate_decides_on_the_whole_interval_in_the_band():
    # the issue-15 targets as gates: valid-rate difference within 0 ± 0.02, duration ratio within 1 ± 0.02
    st = {"max_valid_rate_diff": 0.02, "max_duration_deviation": 0.02}
    fid = {"valid_diff": {"value": -0.099, "low": -0.136, "high": -0.065, "n": 230, "method": "paired bootstrap"},
           "duration_ratio": {"value": 1.097, "low": 1.026, "high": 1.190, "n": 230, "method": "bootstrap"}}
    out = {g["metric"]: g for g in gates.check_gates(fid, st)}  # gpu8's noised variant: both wholly outside
    assert out["valid_diff"]["status"] == "FAIL" and out["duration_ratio"]["status"] == "FAIL"
    assert "within 1 ± 0.02" in out["duration_ratio"]["text"], out
    fid = {"valid_diff": {"value": 0.0, "low": -0.01, "high": 0.01, "n": 230},
           "duration_ratio": {"value": 1.01, "low": 1.0, "high": 1.03, "n": 230}}
    out = {g["metric"]: g for g in gates.check_gates(fid, st)}
    assert out["valid_diff"]["status"] == "PASS"
    # 1.03 crosses the upper edge 1.02: undecided, the estimate taken against that edge: (0.02 / 0.01)^2 x 230 - 230
    assert out["duration_ratio"]["status"] == "INCONCLUSIVE" and out["duration_ratio"]["more_units"] == 230 * 3
    assert gates.decide_band({"value": 1.0, "low": 0.97, "high": 0.99}, 0.98, 1.02) == "INCONCLUSIVE"
    assert gates.decide_band({"value": 0.9, "low": 0.8, "high": 0.95}, 0.98, 1.02) == "FAIL"
    # no interval: the metric's whole range, which no band holds
    assert gates.decide_band({"value": 1.0, "low": None, "high": None}, 0.98, 1.02, (0.0, math.inf)) == "INCONCLUSIVE"
    assert gates.check_gates(fid, {}) == []  # unset tolerances (the default) gate nothing
    # a threshold no value can miss is no gate: the default greedy prefix >= 0.0 is not listed as a PASS
    prefix = {"greedy_prefix": {"value": 0.1, "low": 0.05, "high": 0.15, "n": 12}}
    assert gates.check_gates(prefix, {"min_greedy_prefix_agreement": 0.0}) == []
    assert [g["status"] for g in gates.check_gates(prefix, {"min_greedy_prefix_agreement": 0.2})] == ["FAIL"]


def test_more_units_to_decide_follows_one_over_sqrt_n():
    ci = {"value": 0.95, "low": 0.93, "high": 0.97, "n": 100}  # half-width 0.02, 0.01 from the threshold
    assert stats.more_units_to_decide(ci, 0.94) == 300  # (0.02 / 0.01)^2 * 100 - 100
    assert stats.more_units_to_decide(ci, 0.95) is None


def test_verdict_fail_beats_inconclusive_beats_pass():
    g = [{"status": "PASS", "text": "a"}, {"status": "INCONCLUSIVE", "text": "b"}]
    assert gates.verdict(g, [])["status"] == "INCONCLUSIVE"
    assert gates.verdict(g, ["kernel"])["status"] == "FAIL"
    assert gates.verdict(g[:1], [])["status"] == "PASS" and gates.verdict(g[:1], [])["passed"]
    assert gates.verdict_line(gates.verdict(g, [])) == "INCONCLUSIVE: b"


def test_every_gate_field_is_an_eval_setting():
    from spark_quant.config import EvalConfig

    fields = EvalConfig.model_fields
    for m in METRICS.values():
        assert m.gate is None or m.gate in fields, m
        # a number without a better direction is gated by a tolerance around its target
        assert m.gate is None or m.higher_is_better is not None or m.target is not None, m


def test_several_samples_per_prompt_are_pooled_by_prompt():
    from spark_quant import spark

    ok = [spark.token_id("<|start_semantic_token|>"), spark.semantic_id(1), spark.EOS_ID]
    bad = [spark.semantic_id(1)] * 3
    prompts = [{"mode": "clone"}, {"mode": "clone"}]
    # seed-major: outputs 0, 1 are seed 7 of prompts 0, 1; outputs 2, 3 seed 8
    base = sampled_quality([{"tokens": ok}] * 4, prompts * 2, 8)
    quant = sampled_quality([{"tokens": t} for t in (ok, bad, ok, ok)], prompts * 2, 8)
    fid = fidelity({"sampled": {"baseline": base, "quantized": quant}}, 2)
    assert fid["valid_rate"]["n"] == 4 and fid["valid_rate"]["value"] == pytest.approx(0.75)
    assert fid["per_prompt"]["valid_rate"]["sum"] == [1.0, 0.5]
    assert fid["valid_recovery"]["value"] == pytest.approx(0.75) and fid["valid_recovery"]["n"] == 2


def _res(name: str, prefix: list[float]) -> dict:
    exact = [int(x == 1.0) for x in prefix]
    fid = fidelity({"greedy": {"per_prompt": {"prefix": prefix, "exact": exact, "token": prefix}}}, len(prefix))
    return {"experiment": name, "checkpoint": {"recipe": f"recipes/{name}.yaml"}, "fidelity": fid,
            "prompts": [{"mode": "clone", "text": f"t{i}"} for i in range(len(prefix))],
            "settings": {"samples_per_prompt": 1}, "verdict": {"status": "PASS", "passed": True, "failures": []}}


def test_compare_marks_only_significant_differences_from_the_default_recipe(tmp_path):
    from spark_quant.reporting.compare import render_table, row_from_results, significance_summary

    rng = random.Random(3)
    base = [min(1.0, max(0.0, rng.gauss(0.7, 0.2))) for _ in range(40)]
    rows = [row_from_results(_res("spark-tts_w8a8_int8", base), None, tmp_path),
            row_from_results(_res("same", [min(1.0, x + rng.gauss(0, 0.01)) for x in base]), None, tmp_path),
            row_from_results(_res("worse", [max(0.0, x - 0.2) for x in base]), None, tmp_path)]
    table = render_table(rows)
    line = {r.split(" | ")[0].strip("| "): r for r in table.splitlines() if r.startswith("| ")}
    assert " * " not in line["same"] + " " and "* |" not in line["same"]
    assert "* |" in line["worse"]  # greedy prefix, paired over the same 40 prompts
    assert "differs from `spark-tts_w8a8_int8` significantly" in table
    summary = {s["experiment"]: s for s in significance_summary(rows)}
    assert "greedy_prefix" in summary["worse"]["significant"]
    assert "greedy_prefix" in summary["same"]["not_significant"]
    assert rows[0]["ci"]["greedy_prefix"]["n"] == 40


def test_card_quality_rows_carry_intervals_and_say_whether_the_valid_rate_difference_is_noise():
    from spark_quant import spark
    from spark_quant.reporting.card import _quality_rows, _verdict_text

    ok = [spark.token_id("<|start_semantic_token|>"), spark.semantic_id(1), spark.EOS_ID]
    bad = [spark.semantic_id(1)] * 3
    prompts = [{"mode": "clone"}] * 10
    base = sampled_quality([{"tokens": ok}] * 10, prompts, 8)
    quant = sampled_quality([{"tokens": t} for t in [ok] * 9 + [bad]], prompts, 8)
    sim = {"sampled": {"baseline": base, "quantized": quant, "valid_rate_recovery": 0.9, "duration_ratio": {}}}
    res = {"similarity": sim, "fidelity": fidelity(sim, 10)}
    row = next(r for r in _quality_rows(res) if r["metric"].startswith("valid Spark output rate"))
    assert row["quant"].startswith("0.900 [") and "n=10" in row["quant"]
    assert "the difference is within the noise" in row["ratio"]  # one output of ten
    gate = {"status": "INCONCLUSIVE", "text": "valid rate q/b ...: about 40 more prompts would decide it"}
    assert _verdict_text({"status": "INCONCLUSIVE", "passed": False, "failures": [], "inconclusive": [gate["text"]],
                          "gates": [gate]}, {}).startswith("INCONCLUSIVE: valid rate q/b")


def test_samples_per_prompt_gives_the_sampled_task_one_seed_per_sample_and_inconclusive_exits_4():
    from spark_quant.config import load_experiment
    from spark_quant.errors import Inconclusive, StageFailed
    from spark_quant.serving.client import similarity_tasks

    prompts = [{"ids": [1, 2]}, {"ids": [3]}]
    one = similarity_tasks(load_experiment(None), prompts, None)[1]
    assert one["seed"] == 7 and "seeds" not in one  # one sample: the task (and the baseline cache key) as before
    four = similarity_tasks(load_experiment(None, ["eval.samples_per_prompt=4"]), prompts, None)[1]
    assert four["seeds"] == [7, 8, 9, 10]
    assert Inconclusive.exit_code == 4 and StageFailed.exit_code == 3 and issubclass(Inconclusive, StageFailed)


def _paired_res(seed: int = 5) -> dict:
    """A paired run's result as stages/paired.py writes it: 20 alternated rounds of b1 (ms/token) and c8
    (tokens/s) for BF16, the default recipe and a slower one; its stats computed by the stage's own code."""
    from spark_quant.reporting.paired import cell_stats

    rng = random.Random(seed)
    cells = {}
    for name, conc, base in (("b1", 1, 2.0), ("c8", 8, 1000.0)):
        key = "ms_per_token" if conc == 1 else "tokens_per_s"
        slow = 1.2 if conc == 1 else 1 / 1.2
        raw = []
        for r in range(20):
            drift = 1 + 0.05 * math.sin(r)  # moves every variant of a round together: pairing cancels it
            v = {"bf16": base * drift * rng.gauss(1, 0.01), "spark-tts_w8a8_int8": base * drift * rng.gauss(1, 0.01),
                 "slow": base * slow * drift * rng.gauss(1, 0.01)}
            raw.append({"round": r, "trials": {lb: {key: x} for lb, x in v.items()}})
        c = {"name": name, "concurrency": conc, "tokens": 50, "labels": ["bf16", "spark-tts_w8a8_int8", "slow"],
             "raw": raw}
        c["stats"] = cell_stats(c)
        cells[name] = c
    return {"host": {"gpu": "TEST GPU"}, "git_commit": "abcdef0", "status": "done", "trials": 20, "cells": cells,
            "failed_variants": {"fp8": "needs compute capability 8.9"}}


def test_paired_speed_ratios_become_comparison_columns_with_their_interval_and_verdict(tmp_path):
    from spark_quant.reporting.compare import add_paired, paired_cells_text, render_table, row_from_results

    rng = random.Random(3)
    base = [min(1.0, max(0.0, rng.gauss(0.7, 0.2))) for _ in range(40)]
    rows = [row_from_results(_res("spark-tts_w8a8_int8", base), None, tmp_path),
            row_from_results(_res("slow", base), None, tmp_path)]
    pres = _paired_res()
    add_paired(rows, pres, "bf16")
    default, slow = rows[0]["paired"], rows[1]["paired"]
    assert slow["b1"]["verdict"] == "slower" and slow["b1"]["median"] == pytest.approx(1.2, rel=0.03)
    assert slow["c8"]["verdict"] == "slower" and slow["c8"]["median"] == pytest.approx(1 / 1.2, rel=0.03)
    assert default["b1"]["verdict"] == "no difference" and default["b1"]["lo"] < 1.0 < default["b1"]["hi"]
    assert default["b1"]["n"] == 20
    table = render_table(rows)
    head = table.splitlines()[0]
    assert "paired b1: ms/tok q/b [95% CI]" in head and "paired c8: tok/s q/b [95% CI]" in head
    assert head.rstrip(" |").endswith("verdict")  # the paired columns sit before the verdict
    line = {r.split(" | ")[0].strip("| "): r for r in table.splitlines() if r.startswith("| ")}
    assert "n=20 slower" in line["slow"] and "n=20 no difference" in line["spark-tts_w8a8_int8"]
    text = paired_cells_text(pres, "bf16")
    # the recipes against the default, in the same rounds; the variant that did not start is named
    assert "| b1 | slow / spark-tts_w8a8_int8 |" in text and "slower" in text.split("slow / spark-tts_w8a8_int8")[1]
    assert "`fp8` did not start" in text and "TEST GPU" in text


def test_the_evals_own_batch1_ratio_is_paired_by_repeat_with_an_interval_from_three_repeats(tmp_path):
    from spark_quant.reporting.compare import render_table, row_from_results
    from spark_quant.reporting.metrics import ratio_by_repeat
    from spark_quant.reporting.speed_text import by_repeat_lines as _by_repeat

    # quantized run k right after baseline run k: drift moves both, the per-repeat ratio stays near 1.10
    base = [2.0, 2.6, 2.2, 3.0, 2.4]
    quant = [b * f for b, f in zip(base, (1.10, 1.12, 1.09, 1.11, 1.10))]
    five = ratio_by_repeat(base, quant, higher_is_better=False)
    assert five["n"] == 5 and five["median"] == pytest.approx(1.10) and five["verdict"] == "slower"
    assert 1.0 < five["lo"] <= 1.10 <= five["hi"] <= 1.12
    two = ratio_by_repeat(base[:2], quant[:2], higher_is_better=False)
    assert two["n"] == 2 and two["lo"] is None and two["verdict"] == "too few trials"
    assert ratio_by_repeat([2.0, None, 2.2], [2.2, 2.5, None], False)["n"] == 1  # a failed repeat drops its pair

    text = "\n".join(_by_repeat({"by_repeat": {"ms_per_token_sampled": five, "ms_per_token_greedy": two}}))
    assert f"sampled 1.100 [{five['lo']:.3f}, {five['hi']:.3f}], n = 5 repeats, slower" in text
    assert "greedy 1.110 (no interval under 3 repeats), n = 2 repeats, too few trials" in text
    assert _by_repeat({}) == []

    rows = []
    for name, by in (("spark-tts_w8a8_int8", five), ("two", two)):
        res = _res(name, [0.9, 0.8, 1.0])
        res["ratios"] = {"ms_per_token_sampled": by["median"], "by_repeat": {"ms_per_token_sampled": by}}
        rows.append(row_from_results(res, None, tmp_path))
    line = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in render_table(rows).splitlines() if r.startswith("| ")}
    col = line["experiment"].index("b1 ms/tok sampled q/b")
    assert line["spark-tts_w8a8_int8"][col] == f"1.100 [{five['lo']:.3f}, {five['hi']:.3f}] n=5 runs"
    assert line["two"][col] == "1.110 (n=2 runs, no CI)"


def test_sweep_paired_cells_and_arguments():
    from pathlib import Path

    from spark_quant.config import load_experiment
    from spark_quant.errors import UserError
    from spark_quant.stages.sweep import paired_args, parse_paired_cells

    assert parse_paired_cells("b1=1:200, c256=256:128") == [("b1", 1, 200), ("c256", 256, 128)]
    for bad in ("b1=1", "b1=x:200", "=1:200", "b1=0:200", "b1=1:1", "", "a=1:20,a=2:20"):
        with pytest.raises(UserError, match="--paired-speed"):
            parse_paired_cells(bad)
    root = Path(__file__).resolve().parents[1]
    paths = [root / "experiments/spark-tts_w8a8_int8.yaml", root / "experiments/spark-tts_w4a16_int4.yaml"]
    exps = [load_experiment(p, ["proxy_size=full"]) for p in paths]
    args = paired_args(exps, paths, ["proxy_size=full"], [("b1", 1, 200)], 20, Path("/tmp/x"))
    variants = [args[i + 1] for i, a in enumerate(args) if a == "--variant"]
    assert variants[0] == f"bf16={exps[0].resolved_model()[0] / 'LLM'}" + '::{"replicas": 1}'
    assert variants[1:] == [f"{x.name}={x.checkpoint_dir / 'LLM'}" + '::{"replicas": 1}' for x in exps]
    assert args[args.index("--cell") + 1] == "b1=1:200:bf16,spark-tts_w8a8_int8,spark-tts_w4a16_int4"
    assert args[args.index("--set") + 1] == "proxy_size=full" and args[args.index("--trials") + 1] == "20"
    assert "--parallel-start" not in args
    par = paired_args(exps, paths, [], [("b1", 1, 200)], 20, Path("/tmp/x"), parallel_start=8.0)
    assert par[par.index("--parallel-start") + 1] == "8.0"


def test_sweep_refuses_a_parallel_start_without_paired_cells_before_any_work(tmp_path):
    from pathlib import Path

    from spark_quant.errors import UserError
    from spark_quant.stages.sweep import sweep

    exp = Path(__file__).resolve().parents[1] / "experiments/spark-tts_w8a8_int8.yaml"
    for cells, gib in ((None, 8.0), ("b1=1:200", 0.0), ("b1=1:200", -1.0)):
        with pytest.raises(UserError, match="--paired-parallel-start"):
            sweep([exp], [], tmp_path / "cmp", paired_speed=cells, paired_parallel_start=gib)
    assert not (tmp_path / "cmp").exists()


def test_compare_refuses_a_paired_file_that_is_not_a_paired_run_or_lies_in_its_output(tmp_path):
    from spark_quant.errors import UserError
    from spark_quant.stages.sweep import compare

    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    for name, msg in (("bad.json", "has no 'cells'"), ("broken.json", "not a paired run's JSON"),
                      ("missing.json", "no such file")):
        with pytest.raises(UserError, match=msg):
            compare([tmp_path / "res"], tmp_path / "cmp", paired=tmp_path / name)
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp/paired.json").write_text("{}")
    with pytest.raises(UserError, match="an output can never be an input"):
        compare([tmp_path / "res"], tmp_path / "cmp", paired=tmp_path / "cmp/paired.json")
    assert (tmp_path / "cmp/paired.json").read_text() == "{}" and not (tmp_path / "cmp.json").exists()


def test_a_paired_step_that_writes_nothing_leaves_no_folder_behind(tmp_path, monkeypatch):
    from pathlib import Path

    from spark_quant.config import load_experiment
    from spark_quant.serving import client
    from spark_quant.stages.sweep import _paired_run

    root = Path(__file__).resolve().parents[1]
    path = root / "experiments/spark-tts_w8a8_int8.yaml"
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(path, [])
    (exp.checkpoint_dir / "LLM").mkdir(parents=True)
    (exp.checkpoint_dir / "LLM/config.json").write_text("{}")
    (tmp_path / "eval/sweeps").mkdir(parents=True)
    monkeypatch.setattr(client, "stage_python", lambda env: "false")  # a paired run that dies before writing
    assert _paired_run([exp], [path], [], [("b1", 1, 20)], 3, tmp_path / "eval/sweeps/s") is None
    assert list((tmp_path / "eval/sweeps").iterdir()) == []
    (exp.checkpoint_dir / "LLM/config.json").unlink()  # no checkpoint at all: nothing is started or made
    assert _paired_run([exp], [path], [], [("b1", 1, 20)], 3, tmp_path / "eval/sweeps/s") is None
    assert list((tmp_path / "eval/sweeps").iterdir()) == []


def test_sweep_refuses_an_experiment_named_like_the_paired_baseline_before_any_work(tmp_path, monkeypatch):
    from pathlib import Path

    from spark_quant.errors import UserError
    from spark_quant.stages.sweep import sweep

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="an experiment is named 'bf16'"):
        sweep([root / "experiments/spark-tts_w8a8_int8.yaml"], ["name=bf16"], tmp_path / "eval/sweeps/s", "b1=1:20")
    assert list(tmp_path.iterdir()) == []  # nothing calibrated, nothing written


def test_sweep_paired_first_times_the_checkpoints_before_the_evals_and_writes_speed_then_fidelity(tmp_path, monkeypatch):
    import json
    import subprocess
    import types
    from pathlib import Path

    from spark_quant.errors import UserError
    from spark_quant.stages import sweep as sw

    root = Path(__file__).resolve().parents[1]
    exps = [root / "experiments/spark-tts_w8a8_int8.yaml", root / "experiments/spark-tts_w8a8_int8_static.yaml"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--paired-first: name the cells"):
        sw.sweep(exps, [], tmp_path / "eval/sweeps/s", None, paired_first=True)
    assert list(tmp_path.iterdir()) == []  # refused before any work

    calls: list[str] = []

    def fake_stage(cmd, *a, **k):  # the stage subprocesses: the static recipe's quantize fails
        stage, exp = cmd[3], Path(cmd[5]).stem
        calls.append(f"{stage} {exp}")
        return types.SimpleNamespace(returncode=1 if (stage, exp) == ("quantize", "spark-tts_w8a8_int8_static") else 0)

    pj = tmp_path / ".s-paired.tmp-1" / "paired.json"
    pj.parent.mkdir()
    pj.write_text(json.dumps(_paired_res()))

    def fake_paired(exps_, *a):
        calls.append("paired " + ",".join(x.name for x in exps_))
        return pj

    def fake_compare(dirs, out, paired=None):
        calls.append(f"compare paired={paired is not None}")
        return Path(out)

    monkeypatch.setattr(subprocess, "run", fake_stage)
    monkeypatch.setattr(sw, "_paired_run", fake_paired)
    monkeypatch.setattr(sw, "compare", fake_compare)
    sw.sweep(exps, [], tmp_path / "eval/sweeps/s", "b1=1:20", paired_first=True)
    assert calls == ["calibrate spark-tts_w8a8_int8", "quantize spark-tts_w8a8_int8",
                     "calibrate spark-tts_w8a8_int8_static", "quantize spark-tts_w8a8_int8_static",
                     "paired spark-tts_w8a8_int8", "compare paired=True",
                     "eval spark-tts_w8a8_int8", "compare paired=True"]  # the failed quantize: neither timed nor evaluated
    assert not pj.parent.exists()  # the paired step's temporary folder is gone once the comparison holds it
    calls.clear()
    pj.parent.mkdir()
    pj.write_text(json.dumps(_paired_res()))
    sw.sweep(exps, [], tmp_path / "eval/sweeps/s", "b1=1:20")  # evals first: the failed quantize is not timed
    assert calls == ["calibrate spark-tts_w8a8_int8", "quantize spark-tts_w8a8_int8", "eval spark-tts_w8a8_int8",
                     "calibrate spark-tts_w8a8_int8_static", "quantize spark-tts_w8a8_int8_static",
                     "compare paired=False", "paired spark-tts_w8a8_int8", "compare paired=True"]


def test_compare_with_a_paired_run_and_no_eval_yet_shows_the_speed_columns(tmp_path):
    import json

    from spark_quant.errors import UserError
    from spark_quant.stages.sweep import compare

    pj = tmp_path / "paired.json"
    pj.write_text(json.dumps(_paired_res()))
    dirs = [tmp_path / "eval/results/spark-tts_w8a8_int8", tmp_path / "eval/results/slow"]
    out = compare(dirs, tmp_path / "cmp", paired=pj)
    md = (out / "comparison.md").read_text()
    rows = {r.split(" | ")[0].strip("| "): r for r in md.splitlines() if r.startswith("| ")}
    assert "missing: not evaluated" in rows["slow"] and "n=20 slower" in rows["slow"]
    assert "n=20 no difference" in rows["spark-tts_w8a8_int8"] and (out / "paired.json").is_file()
    with pytest.raises(UserError, match="none of .* is a finished eval folder"):  # without a paired run: refused
        compare(dirs, tmp_path / "cmp2")
