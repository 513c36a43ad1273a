"""The replica dispatcher and the paired driver's mechanics, on stand-in sessions (no vLLM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spark_quant.errors import UserError
from spark_quant.serving.dispatch import Pool, ReplicaError, log_facts, split_counts

FAKE = "tests.fixtures.fake_session"
ROOT = Path(__file__).resolve().parent.parent


def _pool(tmp_path, replicas, **spec):
    return Pool("v", {"model": "m", "fake_trace": str(tmp_path / "trace"), **spec}, replicas, tmp_path,
                sys.executable, module=FAKE, timeout_s=30)


def test_split_counts():
    assert split_counts(5, 2) == [3, 2]
    assert split_counts(1024, 3) == [342, 341, 341]
    assert split_counts(1, 4) == [1, 0, 0, 0]


def test_replicas_start_one_after_another_and_share_a_batch(tmp_path):
    pool = _pool(tmp_path, 3, fake_start_s=0.2)
    try:
        facts = pool.start()
        events = [ln.split() for ln in (tmp_path / "trace").read_text().splitlines()]
        # each replica is launched only after the previous one reported ready
        assert [e[:2] for e in events] == [[k, f"v-r{i}"] for i in range(3) for k in ("launch", "ready")]
        assert all(float(events[i + 1][2]) <= float(events[i + 2][2]) for i in range(0, 4, 2))
        assert facts[0]["weights_gib"] == 0.5 and facts[0]["kv_cache_gib"] == 2.0  # read from the log
        prompts = [[i] for i in range(7)]
        res = pool.load({"prompts": prompts, "concurrency": 7, "max_tokens": 10})
        assert res["concurrency"] == 7 and res["output_tokens"] == 70 and len(res["replica_wall_s"]) == 3
        # round-robin shares 3 + 2 + 2, each starting where the previous one ended: every prompt once
        assert sorted(r["prompt"] for r in res["requests"]) == list(range(7))
        assert res["wall_s"] >= max(res["replica_wall_s"])
        # the stray stdout print of the session went to its log, not into the protocol
        assert "must not reach the protocol" in (tmp_path / "v-r0.log").read_text()
    finally:
        pool.stop()
    assert all(not r.alive() for r in pool.replicas)


def test_a_dead_replica_is_an_error_not_a_hang(tmp_path):
    pool = _pool(tmp_path, 2, fake_die_after=1)
    try:
        pool.start()
        task = {"prompts": [[1]], "concurrency": 2, "max_tokens": 4}
        pool.load(task)
        with pytest.raises(ReplicaError, match="exited|not running"):
            pool.load(task)
            pool.load(task)
    finally:
        pool.stop()


def test_parallel_start_launches_every_pool_before_any_is_ready_and_restarts_a_failed_one_alone(tmp_path):
    from spark_quant.serving.dispatch import start_pools

    trace = str(tmp_path / "trace")
    spec = {"model": "m", "fake_trace": trace, "fake_start_s": 0.3}
    pools = {lb: Pool(lb, {**spec, **extra}, n, tmp_path, sys.executable, module=FAKE, timeout_s=30)
             for lb, n, extra in (("a", 2, {}), ("b", 1, {"fake_fail_unless_again": True}), ("c", 1, {}))}
    said = []
    try:
        out = start_pools(pools, parallel=True, log=said.append)
        events = [ln.split() for ln in (tmp_path / "trace").read_text().splitlines()]
        launches = [e[1] for e in events if e[0] == "launch"]
        first_ready = next(i for i, e in enumerate(events) if e[0] == "ready")
        # all four first sessions launched before any was ready; b's restart came after the others were up
        assert set(launches[:4]) == {"a-r0", "a-r1", "b-r0", "c-r0"} and first_ready >= 4
        assert launches[4:] == ["b-again-r0"]
        assert [e[1] for e in events if e[0] == "ready"][-1] == "b-again-r0"
        assert [len(out[lb]) for lb in "abc"] == [2, 1, 1] and pools["b"].replicas[0].tag == "b-again-r0"
        assert all(e["start_s"] >= 0.3 for e in out["a"])
        assert len(said) == 1 and said[0].startswith("b: did not start beside the others")
        assert "CUDA out of memory" in said[0]
        assert (tmp_path / "b-r0.log").exists()  # the failed attempt's log is kept
    finally:
        for pool in pools.values():
            pool.stop()


def test_sequential_start_reports_a_pool_that_cannot_start_and_stops_it(tmp_path):
    from spark_quant.serving.dispatch import start_pools

    spec = {"model": "m", "fake_trace": str(tmp_path / "trace")}
    pools = {"ok": Pool("ok", spec, 1, tmp_path, sys.executable, module=FAKE, timeout_s=30),
             "bad": Pool("bad", {**spec, "fake_fail_unless_again": True}, 1, tmp_path, sys.executable, module=FAKE,
                         timeout_s=30)}
    try:
        out = start_pools(pools, parallel=False)
        assert len(out["ok"]) == 1 and isinstance(out["bad"], ReplicaError) and "did not start" in str(out["bad"])
        assert not pools["bad"].replicas[0].alive() and pools["ok"].replicas[0].alive()
    finally:
        for pool in pools.values():
            pool.stop()


def test_log_facts():
    text = "x Model loading took 0.95 GiB and 2.1 seconds\nAvailable KV cache memory: 12.5 GiB\n" \
           "GPU KV cache size: 1,091,584 tokens\n"
    assert log_facts(text) == {"weights_gib": 0.95, "kv_cache_gib": 12.5, "kv_cache_tokens_logged": 1091584.0}
    cpu = "Auto set (4.2/17.46) GiB for KV cache on node 0\nCPU KV cache size: 2,202,112 tokens, Maximum"
    assert log_facts(cpu) == {"kv_cache_gib": 4.2, "kv_cache_tokens_logged": 2202112.0}
    fixed = "Explicitly set (0.25/16.21) GiB for KV cache on node 0."  # kv_cache_memory_bytes given
    assert log_facts(fixed) == {"kv_cache_gib": 0.25}
    gpu_fixed = ("Initial free memory 130.12 GiB, reserved 8.00 GiB memory for KV Cache as specified by "
                 "kv_cache_memory_bytes config and skipped memory profiling.")  # vLLM 0.26's gpu_worker.py
    assert log_facts(gpu_fixed) == {"kv_cache_gib": 8.0}


def test_paired_driver_end_to_end_on_stand_in_sessions(tmp_path, tiny_proxy):
    """Two variants resident together (one 3x slower per token), two cells, a curve, an equivalence check.

    The per-token sleeps are long enough (18 vs 54 ms a b1 request) that a loaded CI machine's timer and
    scheduling jitter (a few ms) cannot hide the 3x: at 1.2 vs 3.6 ms a fresh-clone CI run read "no difference"."""
    from spark_quant.stages import paired

    out = tmp_path / "run"
    llm = tiny_proxy / "LLM"
    rc = paired.main(["--out", str(out), "--experiment", str(ROOT / "experiments/spark-tts_w8a8_int8.yaml"),
                      "--variant", f'fast={llm}::{{"replicas": 2, "fake_s_per_token": 3e-4}}',
                      "--variant", f'slow={llm}::{{"fake_s_per_token": 9e-4}}',
                      "--cell", "b1=1:60:fast,slow", "--cell", "c8=8:40:fast,slow", "--trials", "6",
                      "--curve", "fast,slow", "--curve-concurrency", "4,8", "--curve-trials", "3",
                      "--curve-tokens", "60", "--equivalence", "fast,slow",
                      "--session-module", FAKE, "--python", sys.executable])
    assert rc == 0
    res = json.loads((out / "paired.json").read_text())
    assert res["status"] == "done" and res["variants"]["fast"]["topology"]["replicas"] == 2
    b1, c8 = res["cells"]["b1"], res["cells"]["c8"]
    assert len(b1["raw"]) == 6 and [r["order"] for r in b1["raw"][:2]] == [["fast", "slow"], ["slow", "fast"]]
    (r1,) = b1["stats"]["ratios"]
    assert b1["stats"]["metric"] == "ms_per_token" and r1["of"] == "slow" and r1["verdict"] == "slower"
    (r8,) = c8["stats"]["ratios"]
    assert c8["stats"]["metric"] == "tokens_per_s" and r8["median"] < 0.5 and r8["verdict"] == "slower"
    assert [lv["concurrency"] for lv in res["curve"]["levels"]] == [4, 8]
    assert len(res["curve"]["levels"][1]["trials"][0]["fast"]["requests"]) == 8
    assert res["equivalence"][0]["identical_outputs"] == res["equivalence"][0]["prompts"]
    md = (out / "paired.md").read_text()
    assert "slow / fast" in md and "Saturation curve" in md
    assert (out / "saturation.png").stat().st_size > 1000
    assert res["start"] == "one engine after another"


def test_paired_driver_starts_every_engine_at_once_with_a_fixed_kv_cache(tmp_path, tiny_proxy):
    from spark_quant.stages import paired

    out, llm = tmp_path / "run", tiny_proxy / "LLM"
    rc = paired.main(["--out", str(out), "--experiment", str(ROOT / "experiments/spark-tts_w8a8_int8.yaml"),
                      "--variant", f'a={llm}::{{"replicas": 2, "fake_start_s": 0.3}}',
                      "--variant", f'b={llm}::{{"fake_start_s": 0.3, "kv_cache_memory_bytes": 1073741824}}',
                      "--cell", "b1=1:20:a,b", "--trials", "3", "--parallel-start", "2.5",
                      "--session-module", FAKE, "--python", sys.executable])
    assert rc == 0
    res = json.loads((out / "paired.json").read_text())
    assert res["start"] == "parallel, KV cache 2.5 GiB per engine"
    a, b = res["variants"]["a"], res["variants"]["b"]
    assert a["engine_args"]["kv_cache_memory_bytes"] == int(2.5 * 2**30)
    assert b["engine_args"]["kv_cache_memory_bytes"] == 2**30  # a variant's own setting wins
    assert [e["kv_cache_gib"] for e in a["engines"]] == [2.5, 2.5] and b["engines"][0]["kv_cache_gib"] == 1.0
    # three sessions launched together: the run's engines were up in about one start, not three
    assert res["engines_started_s"] < 3 * 0.3 + 2.0
    assert "streams_at_budget" not in a["memory"]  # the share says nothing of "other" memory with a fixed KV cache
    with pytest.raises(UserError, match="--parallel-start 0.0: the KV cache of each engine in GiB must be > 0"):
        paired.main(["--out", str(out), "--variant", f"a={llm}", "--parallel-start", "0"])


def test_serving_processes_keep_nvlink_multicast_off_whatever_the_spec_says(tmp_path, monkeypatch):
    """The GPU hosts' rule: NCCL/PyTorch/NVSHMEM multicast stays off in every serving process, also when the
    caller's environment or an experiment's engine ``env`` asks for it (a one-shot worker and a pool replica)."""
    from spark_quant.serving.client import run_worker
    from spark_quant.serving.procenv import NO_MULTICAST, serving_env

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("SERVE_PYTHON", sys.executable)
    asked = {"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0", "SPARK_QUANT_PROBE": "kept"}
    env = serving_env(asked, {"NVSHMEM_DISABLE_NVLS": "0"})
    assert {k: env[k] for k in NO_MULTICAST} == NO_MULTICAST and env["SPARK_QUANT_PROBE"] == "kept"
    res = run_worker({"model": "m", "dtype": "bfloat16", "env": asked}, tmp_path, "probe", 60,
                     module="tests.fixtures.env_probe")
    assert res["ok"], res
    assert res["env"] == {**NO_MULTICAST, "SPARK_QUANT_PROBE": "kept"}


def _stream_spec(tmp_path, **more):
    prompts = [{"ids": [i], "mode": "clone", "globals": [0] * 32} for i in range(5)]
    return {"model": "m", "fake_trace": str(tmp_path / "trace"),
            "stream": {"prompts": prompts, "concurrency": [1, 5], "requests": 3, "max_tokens": 120,
                       "codec_batch": 4, "partial_path": str(tmp_path / "partial.json")}, **more}


def test_streams_over_replicas_split_each_level_and_summarize_every_request(tmp_path):
    """Two stand-in stream sessions: c=1 runs its 3 requests on the first replica, c=5 splits 3 + 2."""
    from spark_quant.audio.stream_pool import stream_over_replicas

    res = stream_over_replicas(_stream_spec(tmp_path), 2, tmp_path, sys.executable, "v", 30, module=FAKE)
    assert res["ok"] and res["replicas"] == 2 and len(res["engines"]) == 2 and res["codec_batch"] == 4
    c1, c5 = res["rows"]
    assert c1["concurrency"] == 1 and len(c1["requests"]) == 3 and len(c1["replica_wall_s"]) == 1
    assert c5["replica_wall_s"] and len(c5["replica_wall_s"]) == 2
    assert sorted(r["prompt"] for r in c5["requests"]) == list(range(5))  # every prompt once over the two
    for row in (c1, c5):
        # 120 tokens a request: chunks 0-50 and 50-120; the codec calls of both replicas add up
        assert all([(c["start"], c["end"]) for c in r["chunks"]] == [(0, 50), (50, 120)] for r in row["requests"])
        assert row["codec_calls"]["chunks"] == 2 * len(row["requests"]) and row["codec_calls"]["largest_batch"] <= 4
        assert row["summary"]["requests"] == row["summary"]["decoded"] == len(row["requests"])
    assert json.loads((tmp_path / "partial.json").read_text())["rows"][1]["concurrency"] == 5
    ready = [ln.split()[1] for ln in (tmp_path / "trace").read_text().splitlines() if ln.startswith("ready")]
    assert ready == ["v-r0", "v-r1"]  # started one after another


def test_stream_sessions_can_start_at_once_and_one_that_fails_beside_them_starts_alone(tmp_path):
    from spark_quant.audio.stream_pool import stream_over_replicas

    spec = _stream_spec(tmp_path, fake_start_s=0.3, fake_fail_unless_again=True)
    res = stream_over_replicas(spec, 2, tmp_path, sys.executable, "v", 30, module=FAKE, parallel=True)
    events = [ln.split()[:2] for ln in (tmp_path / "trace").read_text().splitlines()]
    # both first sessions launched together (and failed: the stand-in fails unless restarted), then started again
    launched = [e[1] for e in events if e[0] == "launch"]
    assert set(launched[:2]) == {"v-r0", "v-r1"} and launched[2:] == ["v-again-r0", "v-again-r1"]
    assert res["ok"] and len(res["engines"]) == 2 and [r["concurrency"] for r in res["rows"]] == [1, 5]
    again = stream_over_replicas(_stream_spec(tmp_path, fake_start_s=0.3), 2, tmp_path, sys.executable, "w", 30,
                                 module=FAKE, parallel=True)
    assert again["ok"] and all(e["start_s"] >= 0.3 for e in again["engines"])
    launches = [ln.split() for ln in (tmp_path / "trace").read_text().splitlines() if " w-" in ln]
    assert [e[0] for e in launches][:2] == ["launch", "launch"]  # the second launched before the first was ready


def test_warm_levels_runs_an_untimed_round_at_each_load_before_the_timed_one(tmp_path):
    """With ``warm_levels`` every replica gets the c=5 share twice; only the second is the row's."""
    from spark_quant.audio.stream_pool import stream_over_replicas

    spec = _stream_spec(tmp_path)
    spec["stream"]["warm_levels"] = True
    res = stream_over_replicas(spec, 2, tmp_path, sys.executable, "v", 30, module=FAKE)
    c1, c5 = res["rows"]
    assert res["ok"] and c1["warm_wall_s"] is None and c5["warm_wall_s"] > 0
    assert sorted(r["prompt"] for r in c5["requests"]) == list(range(5))  # the timed round alone, every prompt once
    assert c5["codec_calls"]["chunks"] == 2 * 5
    # the first replica serves warm-up, c=1 and the warm c=5 share, then exits at its timed share: so the
    # untimed round really reached the replica before the timed one
    spec = _stream_spec(tmp_path, fake_die_after=3)
    spec["stream"]["warm_levels"] = True
    res = stream_over_replicas(spec, 2, tmp_path, sys.executable, "v", 30, module=FAKE)
    assert res["ok"] is False and "exited" in res["error"] and [r["concurrency"] for r in res["rows"]] == [1]
    spec["stream"]["warm_levels"] = False  # without it the same replica gets through c=5
    res = stream_over_replicas(spec, 2, tmp_path, sys.executable, "v", 30, module=FAKE)
    assert res["ok"] and [r["concurrency"] for r in res["rows"]] == [1, 5]


def test_codec_arms_alternate_round_by_round_on_the_same_sessions_and_pair_by_request(tmp_path):
    """``arms`` + ``rounds``: at c=5 each round runs every arm once, rotated by one each round; c=1 runs once.
    ``compare_arms`` pools each arm over its rounds and pairs it with the first arm request by request."""
    from spark_quant.audio.stream_pool import stream_over_replicas
    from spark_quant.reporting.audio import arm_table, compare_arms

    spec = _stream_spec(tmp_path)
    spec["stream"].update(arms=[{"label": "fifo-4", "codec_order": "fifo", "codec_batch": 4},
                                {"label": "playing-2", "codec_order": "playing", "codec_batch": 2}], rounds=2)
    res = stream_over_replicas(spec, 2, tmp_path, sys.executable, "v", 30, module=FAKE)
    assert res["ok"], res.get("error")
    c1, *c5 = res["rows"]
    assert c1["concurrency"] == 1 and "arm" not in c1
    assert [(r["arm"], r["round"]) for r in c5] == [("fifo-4", 0), ("playing-2", 0), ("playing-2", 1), ("fifo-4", 1)]
    for r in c5:  # the sessions really ran each arm's settings
        assert (r["codec_order"], r["codec_batch"]) == {"fifo-4": ("fifo", 4), "playing-2": ("playing", 2)}[r["arm"]]
        assert 0 < r["codec_calls"]["largest_batch"] <= r["codec_batch"]
        assert sorted(q["prompt"] for q in r["requests"]) == list(range(5))  # same prompts in every run
    ref, other = compare_arms(c5)
    assert (ref["arm"], ref["n"], ref["rounds"]) == ("fifo-4", 10, 2) and "vs" not in ref
    assert other["vs"] == "fifo-4" and other["underrun_diff"]["n"] == other["first_audio_ratio"]["n"] == 10
    assert other["underrun"]["n"] == 10 and other["chunks"] == 2 * 10
    table = arm_table({"bf16": res})
    assert len(table) == 4 and "playing-2 (playing, 2)" in table[3] and "(reference)" in table[2]


def test_a_stream_replica_that_dies_keeps_the_levels_already_measured(tmp_path):
    from spark_quant.audio.stream_pool import stream_over_replicas

    # the first replica answers its warm-up and the c=1 level, then exits at its share of c=5
    res = stream_over_replicas(_stream_spec(tmp_path, fake_die_after=2), 2, tmp_path, sys.executable, "v", 30,
                               module=FAKE)
    assert res["ok"] is False and "exited" in res["error"] and [r["concurrency"] for r in res["rows"]] == [1]
    assert json.loads((tmp_path / "partial.json").read_text())["partial"] is True


def test_engine_memory_is_a_share_or_an_amount_and_a_plan_that_starves_the_codecs_is_refused():
    from spark_quant.audio.stream_pool import engine_memory_share
    # job gpu9's plan (3 engines at 0.28) on an H100's 79.2 GiB: the one that died of CUDA OOM at c = 1,024
    with pytest.raises(ValueError, match=r"^--memory '0.28': 3 engine\(s\) of 22.2 GiB .* 79.2 GiB; "
                                         r"pass --memory 21GiB or less$"):
        engine_memory_share("0.28", 3, 79.2)
    assert engine_memory_share("0.28", 3, 139.8) == 0.28  # the same plan fits an H200 (gpu8)
    assert engine_memory_share("21GiB", 3, 79.2) == pytest.approx(21 / 79.2)  # the hint it gave fits
    assert engine_memory_share("18gib", 3, 139.8) == pytest.approx(18 / 139.8)
    # gpu12: codecs with CUDA graphs held up to 7.3 GiB, and 3 engines of 18 GiB beside them ran out of memory
    from spark_quant.audio.stream_pool import CODEC_GRAPHS_GIB
    with pytest.raises(ValueError, match=r"pass --memory 15GiB or less$"):
        engine_memory_share("18GiB", 3, 79.2, CODEC_GRAPHS_GIB)
    assert engine_memory_share("14GiB", 3, 79.2, CODEC_GRAPHS_GIB) == pytest.approx(14 / 79.2)  # the rerun's plan
    with pytest.raises(ValueError, match="pass fewer --replicas"):
        engine_memory_share("1GiB", 20, 79.2)
    for bad in ("lots", "", "0", "1.5", "200GiB", "-3GiB"):
        with pytest.raises(ValueError, match=rf"^--memory {bad!r}"):
            engine_memory_share(bad, 1, 79.2)


def test_the_eval_streams_engines_leave_their_codecs_room_on_a_smaller_gpu():
    from spark_quant.audio.stream_pool import fitting_share
    # eval.replicas = 3 at 0.3 each (0.9 / 3): on an H100 the engines would starve the codecs (gpu9's OOM's twin)
    assert fitting_share(0.3, 3, 79.2) == pytest.approx((79.2 / 3 - 4.5) / 79.2)
    assert fitting_share(0.3, 3, 139.8) == 0.3  # an H200 has room
    assert fitting_share(0.3, 3, None) == 0.3  # no nvidia-smi: as configured
    with pytest.raises(ValueError, match=r"^20 engine \+ codec sessions do not fit a 79.2 GiB GPU; set fewer eval.replicas$"):
        fitting_share(0.045, 20, 79.2)


def test_the_eval_audio_step_lowers_or_refuses_each_models_share_before_any_engine_starts(tmp_path, monkeypatch, capsys):
    from spark_quant.audio import evalstep
    from spark_quant.config import load_experiment

    started = []
    monkeypatch.setattr(evalstep, "resolve_codec_dir", lambda model, root: (tmp_path, "proxy"))
    monkeypatch.setattr(evalstep, "stream_over_replicas",
                        lambda spec, n, *a, **k: started.append((spec["gpu_memory_utilization"], n)) or {"ok": True})
    prompts = [{"ids": [1, 2], "mode": "controllable"}, {"ids": [3, 4], "mode": "clone"}]
    specs = {"baseline": {"model": "m", "device": "cuda"}, "quantized": {"model": "q", "device": "cuda"}}
    exp = load_experiment(None, ["eval.audio_samples=0", "eval.audio_stream_concurrency=[1]", "eval.replicas=3"])
    monkeypatch.setattr(evalstep, "gpu_memory_gib", lambda: 79.2)
    res = evalstep.audio_step(exp, tmp_path / "out", prompts, {}, tmp_path, True, specs, tmp_path, python="py")
    assert started == [(pytest.approx((79.2 / 3 - 4.5) / 79.2), 3)] * 2 and res["audio_stream"]["models"]["baseline"]["ok"]
    started.clear()
    exp = load_experiment(None, ["eval.audio_samples=0", "eval.audio_stream_concurrency=[1]", "eval.replicas=20"])
    res = evalstep.audio_step(exp, tmp_path / "out", prompts, {}, tmp_path, True, specs, tmp_path, python="py")
    assert started == [] and "set fewer eval.replicas" in res["audio_stream"]["models"]["quantized"]["error"]
    assert "eval: audio stream of baseline skipped: 20 engine" in capsys.readouterr().err


def test_codec_arms_are_order_colon_batch_and_a_bad_or_repeated_arm_is_refused():
    from spark_quant.audio.stream_pool import parse_arms
    assert parse_arms("fifo:16, playing:64,playing:16:graphs") == [
        {"label": "fifo-16", "codec_order": "fifo", "codec_batch": 16, "codec_graphs": False},
        {"label": "playing-64", "codec_order": "playing", "codec_batch": 64, "codec_graphs": False},
        {"label": "playing-16-graphs", "codec_order": "playing", "codec_batch": 16, "codec_graphs": True}]
    for bad in ("lifo:16", "fifo", "fifo:0", "fifo:x", "playing:-2", "playing:16:graph", "fifo:16:graphs:x"):
        with pytest.raises(ValueError, match=rf"^--arms: '{bad}' is not ORDER:BATCH\[:graphs\] \(ORDER one of fifo, deadline, playing"):
            parse_arms(bad)
    with pytest.raises(ValueError, match=r"^--arms: 'fifo:16,fifo:16' names an arm twice$"):
        parse_arms("fifo:16,fifo:16")
