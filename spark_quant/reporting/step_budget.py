"""How far quantizing the linear layers can speed a GPU-bound decode step: a step profile's budget, part by part.

Input: two rows of ``serving/stepprof.py`` results (one decode step's GPU kernel time by kind, one concurrency and
sampling mode), a reference (BF16) and a quantized variant. The step's GPU time is split into what weight-and-
activation quantization touches (the body GEMMs; the activation quantization it adds) and what it does not (the
``lm_head`` GEMM, attention, sampling, norms and the rest). When the GPU is the bottleneck (saturation), throughput
is inverse to that time, so the reference's parts bound every quantized variant (Amdahl): with the body GEMMs
``k`` times faster and the quantization free, the step is ``busy - body * (1 - 1/k)``.

Pure: result dicts in, numbers out.
"""

from __future__ import annotations

import math
from typing import Any

INT8_PEAK = 2.0  # dense INT8 over BF16 tensor-core peak on Hopper (and Ampere)


def parts(row: dict[str, Any]) -> dict[str, float]:
    """One step's GPU ms by part. ``lm_head`` is the step's one-call 16-bit GEMM (its time alone when the profile's
    top kernels do not show it); ``act_quant_standalone``: the quantization kernels (vLLM's CUDA ops);
    ``norm_silu``: the norms and SiLU-and-mul. Inductor names a W8A8 model's norm and SiLU kernels after the
    quantization op (``triton_per_fused_dynamic_scaled_int8_quant_fused_add_rms_norm_0``) because it fuses the
    op's ``input.contiguous()`` into them; the step profile counts them as ``act_quant``, here they are norms."""
    cat, top = row["ms_by_category"], row.get("top_kernels") or []
    head = next((k["ms"] for k in top if k["category"] == "gemm_16bit" and round(k["calls"]) == 1), None)
    head = row.get("lm_head_alone_ms") or 0.0 if head is None else head
    standalone = sum(k["ms"] for k in top if k["category"] == "act_quant" and not k["name"].startswith("triton_"))
    fused_quant = cat.get("act_quant", 0.0) - standalone
    fused_norms = sum(k["ms"] for k in top if k["category"] == "other" and k["name"].startswith("triton_")
                      and ("rms_norm" in k["name"] or "silu" in k["name"]))
    return {"body_gemm": cat.get("gemm_int8", 0.0) + cat.get("gemm_16bit", 0.0) - head, "lm_head": head,
            "act_quant_standalone": standalone, "norm_silu": fused_quant + fused_norms,
            "attention": cat.get("attention", 0.0), "sampling": cat.get("sampling", 0.0),
            "other": cat.get("other", 0.0) - fused_norms + cat.get("copies", 0.0), "busy": row["gpu_busy_ms"]}


def budget(ref: dict[str, Any], quant: dict[str, Any], target: float = 1.3) -> dict[str, Any]:
    """The two steps part by part, the GPU-bound throughput ratio they imply (ref busy / quant busy), the ceilings of
    any linear-layer quantization (body GEMMs at the INT8 peak or free, quantization free), and the body-GEMM
    speed-up that ``target`` would need (inf: unreachable whatever the GEMMs do)."""
    r, q = parts(ref), parts(quant)
    busy, body = r["busy"], r["body_gemm"]
    cut = busy - busy / target  # GPU ms per step the target needs removed
    need = body / (body - cut) if cut < body else math.inf
    return {"concurrency": ref["concurrency"], "mode": ref["mode"], "ref": r, "quant": q,
            "ratio_gpu_bound": busy / q["busy"], "body_share": body / busy,
            "ceiling_int8_peak": busy / (busy - body * (1 - 1 / INT8_PEAK)), "ceiling_free_gemms": busy / (busy - body),
            "gemm_ratio": q["body_gemm"] / body if body else None,
            "target": target, "gemm_speedup_needed": need}


def render(rows: list[dict[str, Any]], ref_name: str, quant_name: str) -> list[str]:
    """A markdown table: one column pair per (concurrency, mode), ms per step, then the ratios and ceilings."""
    keys = ["body_gemm", "act_quant_standalone", "lm_head", "attention", "sampling", "norm_silu", "other", "busy"]
    names = {"body_gemm": "body GEMMs (the layers quantized)", "act_quant_standalone": "activation quantization, "
             "own kernels", "lm_head": "lm_head GEMM (not quantized)", "attention": "attention + KV cache writes",
             "sampling": "sampling", "norm_silu": "norms, SiLU-and-mul",
             "other": "other, copies", "busy": "**GPU busy per step**"}
    head = "| ms per step | " + " | ".join(f"c = {b['concurrency']} {b['mode']}: {ref_name} | {quant_name}"
                                          for b in rows) + " |"
    out = [head, "|---|" + "---|---|" * len(rows)]
    for k in keys:
        out.append(f"| {names[k]} | " + " | ".join(f"{b['ref'][k]:.3f} | {b['quant'][k]:.3f}" for b in rows) + " |")

    def line(label: str, fn) -> str:
        return f"| {label} | " + " | ".join(f"{fn(b)} | " for b in rows) + " |"

    out += [line(f"{quant_name} / {ref_name} GEMM time", lambda b: f"{b['gemm_ratio']:.2f}x"),
            line("throughput ratio if GPU-bound (busy ratio)", lambda b: f"{b['ratio_gpu_bound']:.3f}"),
            line("body GEMMs' share of the reference step", lambda b: f"{100 * b['body_share']:.0f}%"),
            line(f"ceiling: GEMMs at the INT8 peak ({INT8_PEAK:.0f}x), quantization free",
                 lambda b: f"{b['ceiling_int8_peak']:.2f}x"),
            line("ceiling: body GEMMs free", lambda b: f"{b['ceiling_free_gemms']:.2f}x"),
            line(f"GEMM speed-up a {rows[0]['target']}x target needs",
                 lambda b: "unreachable" if math.isinf(b["gemm_speedup_needed"]) else f"{b['gemm_speedup_needed']:.1f}x")]
    return out
