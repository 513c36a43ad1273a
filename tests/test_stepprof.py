"""The decode-step breakdown: kernel names sorted into kinds, busy time as a union, per-step differencing."""

from __future__ import annotations

import pytest

from spark_quant.stepprof import _diff_per_step, _union_us, classify, kernel_summary


@pytest.mark.parametrize("name,kind", [
    ("void cutlass::device_kernel<vllm::cutlass_3x_gemm<signed char, cutlass::bfloat16_t, ...>>", "gemm_int8"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s8_i16832gemm_s8_64x64_128x3>", "gemm_int8"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "gemm_16bit"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm_16bit"),
    ("void vllm::dynamic_scaled_int8_quant_kernel<c10::BFloat16, float>(...)", "act_quant"),
    ("void vllm::rms_norm_dynamic_per_token_quant_kernel<c10::BFloat16, signed char, true>", "act_quant"),
    ("triton_red_fused__to_copy_abs_add_amax_clamp_div_mean_mul_pow_round_rsqrt_0", "act_quant"),
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
    from spark_quant.stepprof import reclassify

    row = {"ms_by_category": {"gemm_16bit": 0.8, "attention": 0.04},
           "top_kernels": [{"name": "cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", "ms": 0.14,
                            "calls": 24, "category": "gemm_16bit"}]}
    out = reclassify(row)
    assert out["ms_by_category"]["gemm_16bit"] == pytest.approx(0.66)
    assert out["ms_by_category"]["attention"] == pytest.approx(0.18)
    assert out["top_kernels"][0]["category"] == "attention"
