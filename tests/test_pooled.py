"""Pooling one paired ratio over several machines (reporting/pooled.py, stages/pooled.py): pure, no engine."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import ROOT
from safety_helpers import tree_state

from spark_quant.artifacts import read_manifest
from spark_quant.errors import UserError
from spark_quant.reporting.pooled import pool, run_ratio
from spark_quant.stages import pooled as stage


def fake_run(ratio: float, noise: float, seed: int, rounds: int = 20, concurrency: int = 1024) -> dict:
    """A paired run's result: ``new`` at ``ratio`` x ``ref``'s tokens/s, each trial with lognormal noise."""
    rng = np.random.default_rng(seed)
    ref = 70_000 * np.exp(rng.normal(0, noise, rounds))
    new = ref * ratio * np.exp(rng.normal(0, noise, rounds))
    raw = [{"round": i, "trials": {"ref": {"tokens_per_s": float(a)}, "new": {"tokens_per_s": float(b)}}}
           for i, (a, b) in enumerate(zip(ref, new))]
    return {"created": f"2026-12-0{seed % 9 + 1}", "host": {"gpu": "NVIDIA H200"}, "git_commit": "abc",
            "variants": {"ref": {"engines": [{}] * 3}, "new": {"engines": [{}] * 3}},
            "cells": {"c1024": {"concurrency": concurrency, "labels": ["ref", "new"], "raw": raw}}}


def ratios(runs):
    return [run_ratio(r, "c1024", "new", "ref", f"m{i}") for i, r in enumerate(runs)]


def test_machines_that_agree_pool_to_a_narrower_interval_with_no_spread_between_them():
    rs = ratios([fake_run(0.93, 0.01, s) for s in range(4)])
    p = pool(rs)
    assert p["k"] == 4 and p["n"] == 80 and p["tau_percent"] < 0.5 and p["q_pvalue"] > 0.05
    assert p["lo"] < 0.93 < p["hi"] and p["verdict"] == "slower"
    assert p["hi"] - p["lo"] < max(r["hi"] - r["lo"] for r in rs)
    assert p["prediction"]["lo"] < 0.93 < p["prediction"]["hi"]


def test_machines_that_differ_widen_the_pooled_interval_and_show_the_spread():
    """Three machines at 0.90 / 0.95 / 1.00, each measured precisely: each run's CI excludes the others' medians
    (the two-machine check fails), the spread is tau (about 5%), and the pooled CI holds every machine's mean."""
    rs = ratios([fake_run(x, 0.004, s) for s, x in enumerate((0.90, 0.95, 1.00))])
    p = pool(rs)
    assert all(not q["inside_each_other"] for q in p["pairs"])
    assert 3 < p["tau_percent"] < 8 and p["i2"] > 0.9 and p["q_pvalue"] < 1e-6
    assert p["lo"] < 0.90 and p["hi"] > 0.99
    assert p["verdict"] == "no difference"  # three machines this far apart cannot rank the variants
    assert all(p["hi"] - p["lo"] > 3 * (r["hi"] - r["lo"]) for r in rs)


def test_batch1_ratios_are_ms_per_token_and_a_run_without_the_cell_or_label_is_named():
    run = fake_run(1.1, 0.01, 0, concurrency=1)
    for rnd in run["cells"]["c1024"]["raw"]:
        rnd["trials"] = {k: {"ms_per_token": 1000 / v["tokens_per_s"]} for k, v in rnd["trials"].items()}
    r = run_ratio(run, "c1024", "new", "ref", "b1 run")
    assert r["metric"] == "ms_per_token" and r["median"] == pytest.approx(1 / 1.1, rel=0.02) and r["verdict"] == "faster"
    with pytest.raises(ValueError, match="^b1 run: no cell 'c256' \\(cells: c1024\\)$"):
        run_ratio(run, "c256", "new", "ref", "b1 run")
    with pytest.raises(ValueError, match="has no variant w8a8 \\(it has ref, new\\)"):
        run_ratio(run, "c1024", "w8a8", "ref", "b1 run")
    with pytest.raises(ValueError, match="at least 2 runs"):
        pool([r])


def test_the_three_h200_runs_pooled_slower_at_saturation_and_no_difference_at_batch_1():
    """The committed raw rounds of the three H200 paired runs (docs/results/h200-*): the saturation ratios
    differ between machines by more than their own CIs allow (Cochran's Q), which the pooled CI absorbs."""
    res = ROOT / "docs/results"
    runs = [("A", res / "h200-paired/paired.json.gz"), ("B", res / "h200-gpu2/paired.json"),
            ("C", res / "h200-gpu3/paired.json")]
    cells = stage.pooled(runs, "w8a8-x3mp", "bf16-x3mp", ["b1", "c1024"])
    sat, b1 = cells["c1024"]["pooled"], cells["b1"]["pooled"]
    assert [round(r["median"], 3) for r in cells["c1024"]["runs"]] == [0.948, 0.915, 0.928]
    assert sat["verdict"] == "slower" and sat["q_pvalue"] < 0.01 and sat["tau_percent"] > 1
    assert sat["lo"] < 0.915 and 0.948 < sat["hi"] < 1.0
    assert b1["verdict"] == "no difference" and b1["q_pvalue"] > 0.05
    assert {r["model"] for r in cells["b1"]["runs"]} == {"Spark-TTS-proxy-full-s0/LLM"}


def test_runs_of_different_devices_or_models_are_pooled_with_a_line_that_says_so():
    from spark_quant.reporting.pooled import render_markdown

    a, b = fake_run(0.93, 0.01, 0), fake_run(0.93, 0.01, 1)
    b["host"] = {"gpu": "NVIDIA H100 80GB HBM3"}
    a["variants"]["ref"]["path"], b["variants"]["ref"]["path"] = "build/proxy/random/LLM", "build/proxy/trained/LLM"
    rs = ratios([a, b])
    md = render_markdown("t", {"c1024": {"of": "new", "to": "ref", "runs": rs, "pooled": pool(rs)}})
    assert "The runs differ in device (NVIDIA H100 80GB HBM3, NVIDIA H200)" in md
    assert "The runs differ in model (random/LLM, trained/LLM)" in md


def test_cli_writes_its_folder_reads_gzip_and_refuses_what_it_did_not_make(tmp_path, capsys):
    paths = []
    for i, x in enumerate((0.92, 0.93)):
        p = tmp_path / f"run{i}.json.gz"
        p.write_bytes(gzip.compress(json.dumps(fake_run(x, 0.01, i)).encode()))
        paths.append(p)
    args = ["--run", f"A={paths[0]}", "--run", f"B={paths[1]}", "--ratio", "new/ref", "--cell", "c1024"]
    assert stage.main([*args, "--out", str(tmp_path / "pool")]) == 0
    out = tmp_path / "pool"
    assert read_manifest(out)["stage"] == "pooled" and (out / "forest.png").stat().st_size > 5000
    assert json.loads((out / "pooled.json").read_text())["cells"]["c1024"]["pooled"]["k"] == 2
    assert "**pooled, 2 runs**" in (out / "pooled.md").read_text() and "| A vs B |" in capsys.readouterr().out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pooled.md").write_text("notes")
    before = tree_state(tmp_path)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match="mine: exists and is not a folder spark-quant made"):
            stage.main([*args, "--out", str(mine), *extra])
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        stage.main([*args, "--out", str(out)])
    with pytest.raises(UserError, match=r"run0.json.gz: A: no cell 'b1' \(cells: c1024\)$"):
        stage.main([*args, "--cell", "b1", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--ratio 'new': expected OF/TO"):
        stage.main([*args[:4], "--ratio", "new", "--cell", "c1024", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="nowhere.json: no such file"):
        stage.main(["--run", f"A={paths[0]}", "--run", f"B={tmp_path / 'nowhere.json'}", "--ratio", "new/ref",
                    "--cell", "c1024", "--out", str(tmp_path / "x")])
    assert tree_state(tmp_path) == before
