"""The decode-step breakdown: kernel names sorted into kinds, busy time as a union, per-step differencing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TEST_KV_CACHE

from spark_quant.serving.stepprof import _diff_per_step, _union_us, classify, kernel_summary


@pytest.mark.parametrize("name,kind", [
    ("void cutlass::device_kernel<vllm::cutlass_3x_gemm<signed char, cutlass::bfloat16_t, ...>>", "gemm_int8"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s8_i16832gemm_s8_64x64_128x3>", "gemm_int8"),
    ("scaled_mm_kernel", "gemm_int8"),  # vLLM's Triton INT8 GEMM (triton_scaled_mm.py, linear_backend "triton")
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "gemm_16bit"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm_16bit"),
    ("void vllm::dynamic_scaled_int8_quant_kernel<c10::BFloat16, float>(...)", "act_quant"),
    ("void vllm::rms_norm_dynamic_per_token_quant_kernel<c10::BFloat16, signed char, true>", "act_quant"),
    ("triton_red_fused__to_copy_abs_add_amax_clamp_div_mean_mul_pow_round_rsqrt_0", "act_quant"),
    # H100 run 4's W8A8 norm / SiLU kernels: named after the quantization op, whose CUDA kernel does the quantizing
    ("triton_per_fused_dynamic_scaled_int8_quant_fused_add_rms_norm_0", "other"),
    ("triton_poi_fused_dynamic_scaled_int8_quant_mul_silu_slice_1", "other"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<64, 64, 128, 4>>", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16>", "attention"),
    ("void at::native::radixSortKVInPlace<-2, -1, 32, 4, float, long, int>", "sampling"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "sampling"),
    ("Memcpy DtoH (Device -> Pinned)", "copies"),
    ("triton_poi_fused_add_mul_silu_slice_1", "other"),
    ("void vllm::rms_norm_kernel<c10::BFloat16>", "other"),
])
def test_kernel_names_are_sorted_into_kinds(name, kind):
    assert classify(name) == kind


def test_busy_time_is_the_union_of_overlapping_kernels():
    assert _union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert _union_us([]) == 0


def test_per_step_numbers_are_the_difference_of_two_lengths():
    def run(steps: int):  # fixed prefill kernels + per-step GEMM 0.3 ms and quant 0.1 ms
        evs = [("prefill_gemm_bf16", 0, 5000)]
        t = 5000.0
        for _ in range(steps):
            evs += [("cutlass_int8_gemm", t, t + 300), ("dynamic_scaled_int8_quant", t + 300, t + 400)]
            t += 1000
        return kernel_summary(evs)

    d = _diff_per_step(run(80), run(16), 64)
    assert d["ms_by_category"]["gemm_int8"] == pytest.approx(0.3)
    assert d["ms_by_category"]["act_quant"] == pytest.approx(0.1)
    assert d["ms_by_category"]["gemm_16bit"] == pytest.approx(0.0)  # prefill cancelled out
    assert d["gpu_busy_ms"] == pytest.approx(0.4) and d["kernels_per_step"] == pytest.approx(2)
    assert d["top_kernels"][0]["name"] == "cutlass_int8_gemm" and d["top_kernels"][0]["calls"] == pytest.approx(1)


def test_flash_attention_kernels_are_attention_not_gemms():
    # FlashAttention 3 on Hopper is a cutlass kernel: it must not be counted as a GEMM
    assert classify("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::"
                    "CollectiveMainloopFwdSm90<2, cute::tuple<...>>>>>") == "attention"
    assert classify("void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<cute::C<16>>, 5, 256>>") \
        == "attention"


def test_reclassify_moves_recorded_time_to_the_new_kind():
    from spark_quant.serving.stepprof import reclassify

    row = {"ms_by_category": {"gemm_16bit": 0.8, "attention": 0.04},
           "top_kernels": [{"name": "cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", "ms": 0.14,
                            "calls": 24, "category": "gemm_16bit"}]}
    out = reclassify(row)
    assert out["ms_by_category"]["gemm_16bit"] == pytest.approx(0.66)
    assert out["ms_by_category"]["attention"] == pytest.approx(0.18)
    assert out["top_kernels"][0]["category"] == "attention"


def test_phase_timer_counts_reentrant_calls_once_and_restores(monkeypatch):
    import types

    from spark_quant.serving import stepprof
    from spark_quant.serving.stepprof import PhaseTimer, cpu_phase_diff, phase_delta

    clock = [0.0]  # a fake clock: the timer's arithmetic is checked exactly, not the machine's sleep
    monkeypatch.setattr(stepprof, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    mod = types.ModuleType("fake_engine")

    class Base:
        def step(self, n):
            clock[0] += 0.002 * n
            return n

    class Child(Base):
        def step(self, n):  # a subclass calling super(): one call, not two
            return super().step(n)

    mod.Base, mod.Child = Base, Child
    monkeypatch.setitem(sys.modules, "fake_engine", mod)
    orig = Child.__dict__["step"]
    timer = PhaseTimer([("fake_engine", "Child", "step", "step"), ("fake_engine", "Base", "step", "step"),
                        ("fake_engine", "Child", "absent", "x"), ("no_such_module", "A", "b", "y")])
    assert timer.missing == ["Child.absent", "A.b"]
    runs = {}
    for n in (1, 5):
        before = timer.snapshot()
        for _ in range(n):
            assert Child().step(n) == n
        runs[n] = phase_delta(timer.snapshot(), before)
    assert runs[1]["step"][1] == 1 and runs[5]["step"][1] == 5
    per = cpu_phase_diff(runs[5], runs[1], 4)
    assert per["step"]["calls"] == 1.0
    assert per["step"]["ms"] == pytest.approx(12.0)  # (5 calls x 10 ms - 1 call x 2 ms) / 4 = 12 ms
    timer.restore()
    assert Child.__dict__["step"] is orig


@pytest.mark.e2e
def test_stepprof_on_vllm_cpu_breaks_the_host_side_of_a_step_down(tiny_proxy, tmp_path):
    from conftest import serve_python

    from spark_quant.reporting.report import render_step_profile

    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM")
    spec = {"model": str(tiny_proxy / "LLM"), "dtype": "bfloat16", "max_model_len": 256,
            "gpu_memory_utilization": 0.08, "concurrency": [1, 4], "short": 4, "long": 16, "modes": ["greedy"],
            "engine_overrides": TEST_KV_CACHE}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([py, "-m", "spark_quant.serving.stepprof", str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["ok"], (res.get("error"), proc.stderr[-2000:])
    assert [r["concurrency"] for r in res["rows"]] == [1, 4]
    for row in res["rows"]:
        ph = row["cpu_phases"]
        step, core = ph["engine step (all host work)"], ph["engine core step"]
        runner = ph["model runner: prepare inputs + launch"]
        # one engine step, one schedule and one forward per generated token
        assert step["calls"] == core["calls"] == ph["schedule"]["calls"] == runner["calls"] == 1.0
        # inclusive phases nest; on a CPU the forward itself is host work, so the step is nearly all of the wall
        assert 0 < runner["ms"] < core["ms"] <= step["ms"] * 1.001
        assert 0.5 * row["wall_ms_per_step_mean"] < step["ms"] < 1.2 * row["wall_ms_per_step_mean"]
    md = "\n".join(render_step_profile({"tiny": res}))
    assert "### The host side of a decode step" in md and "| tiny | 4 | greedy |" in md
