"""The paired speed method: variants resident on the GPU together, trials alternated within seconds.

    python -m spark_quant.stages.paired --out DIR --variant LABEL=PATH[::JSON] [--variant ...]
        --cell NAME=CONCURRENCY:TOKENS:LABEL,LABEL[,...][:greedy] [--cell ...] [--trials 20]
        [--curve LABEL,LABEL --curve-concurrency 1,64,256,512,1024 --curve-trials 3 --curve-tokens 200]
        [--equivalence LABEL,LABEL] [--experiment EXP.yaml] [--gpu-share F] [--memory-budget-gib 20]
        [--parallel-start GIB]

Runs in the serving environment. Every variant is a ``Pool`` (``dispatch.py``): ``replicas`` long-lived
engine sessions of one checkpoint (``PATH`` is its ``LLM/`` folder). JSON sets the variant's topology and
engine: ``replicas``, ``executor`` (vLLM's ``distributed_executor_backend``, e.g. ``"mp"``),
``data_parallel_size``, ``max_num_seqs``, ``memory`` (GPU share of each engine), ``env`` (the sessions'
environment) and any other vLLM engine argument. Engines start one at a time, each after the previous one is
ready, or with ``--parallel-start GIB`` all at once, each with a fixed KV cache; all stay resident until the end.

A *cell* times ``CONCURRENCY`` requests of ``TOKENS`` new tokens (ignore EOS; sampled T/top-k/top-p from the
experiment unless ``greedy``) on each of its variants. One untimed round warms every shape; then each round
runs every variant once, the order reversed every other round (A B, B A, ...), for ``--trials`` rounds. The
metric of a trial is ms/token of the one stream at concurrency 1 and aggregate output tokens/s above. Each
variant's median gets a 95% bootstrap CI and n; each ratio against the cell's first variant (and between
every pair) is the median of the per-round ratios with a paired 95% bootstrap CI; a CI that contains 1.0 is
"no difference". Raw trials are kept in ``paired.json``, rewritten after every cell.

The *curve* is aggregate tokens/s against offered concurrency per variant (rounds alternated the same way);
from it, *streams*: the highest concurrency whose p99 per-stream real-time factor (request time over audio
time, 50 tokens = 1 s) is below 1, with time to first audio (``first_audio_tokens``) p99 there. *Memory*:
each variant's weights and KV cache per engine (vLLM's start-up log) and the streams of ``prompt +
--stream-tokens`` tokens that fit in ``--memory-budget-gib`` per replica.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from spark_quant.errors import UserError, run_main
from spark_quant.outputs import check_not_a_source, check_writable, live_folder
from spark_quant.reporting import speed_stats as stats
from spark_quant.reporting.fmt import ci_text
from spark_quant.reporting.paired import cell_stats, memory_row, rtf, streams_from_curve, trial_metrics
from spark_quant.serving.dispatch import SESSION_MODULE, Pool, ReplicaError, fixed_kv_cache, gpu_memory_gib, start_pools

TOPOLOGY_KEYS = ("replicas", "executor", "data_parallel_size", "max_num_seqs", "memory", "env", "int8_fused")


# --- arguments ------------------------------------------------------------------------------------
def parse_variant(arg: str) -> dict[str, Any]:
    label, sep, rest = arg.partition("=")
    if not sep or not label or not rest:
        raise UserError(f"--variant {arg!r}: expected LABEL=PATH[::JSON]")
    path, _, js = rest.partition("::")
    try:
        extra = json.loads(js) if js else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--variant {label}: the JSON after '::' does not parse ({e.msg}); "
                        'e.g. {"replicas": 3, "executor": "mp"}') from None
    if not isinstance(extra, dict):
        raise UserError(f"--variant {label}: the JSON after '::' must be an object")
    return {"label": label, "path": path, "topology": {k: extra.pop(k) for k in TOPOLOGY_KEYS if k in extra},
            "engine": extra}


def parse_cell(arg: str) -> dict[str, Any]:
    name, sep, rest = arg.partition("=")
    parts = rest.split(":")
    if not sep or len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "greedy"):
        raise UserError(f"--cell {arg!r}: expected NAME=CONCURRENCY:TOKENS:LABEL,LABEL[:greedy]")
    try:
        conc, tokens = int(parts[0]), int(parts[1])
    except ValueError:
        raise UserError(f"--cell {arg!r}: CONCURRENCY and TOKENS must be integers") from None
    if conc < 1 or tokens < 2:
        raise UserError(f"--cell {arg!r}: CONCURRENCY must be >= 1 and TOKENS >= 2")
    return {"name": name, "concurrency": conc, "tokens": tokens, "labels": parts[2].split(","),
            "greedy": len(parts) == 4}


# --- engine specs ---------------------------------------------------------------------------------
def variant_spec(exp, variant: dict[str, Any], share: float) -> dict[str, Any]:
    """A session spec for one variant: the experiment's engine settings, then the variant's own."""
    from spark_quant.serving.client import compact_capture_sizes, worker_spec

    topo, engine = variant["topology"], dict(variant["engine"])
    if "int8_fused" in topo:
        exp = exp.model_copy(update={"eval": exp.eval.model_copy(update={"int8_fused": bool(topo["int8_fused"])})})
    spec = worker_spec(exp, Path(variant["path"]), exp.eval.baseline_dtype)
    max_seqs = int(topo.get("max_num_seqs", spec["max_num_seqs"]))
    spec["max_num_seqs"] = max_seqs
    spec["gpu_memory_utilization"] = float(topo.get("memory", share)) if spec["device"] == "cuda" \
        else spec["gpu_memory_utilization"]
    over = dict(spec["engine_overrides"])
    cc = dict(over.get("compilation_config") or {})
    if "cudagraph_capture_sizes" in cc:  # no graph larger than the engine's batch
        sizes = compact_capture_sizes(sorted({c for c in exp.eval.concurrency if c <= max_seqs} | {max_seqs}))
        cc["cudagraph_capture_sizes"] = sizes
    cc.update(engine.pop("compilation_config", {}))
    if cc:
        over["compilation_config"] = cc
    over.update(engine)
    if topo.get("executor") == "default":  # vLLM's own choice, whatever the experiment says
        over.pop("distributed_executor_backend", None)
    elif topo.get("executor"):
        over["distributed_executor_backend"] = topo["executor"]
    if topo.get("data_parallel_size"):
        over["data_parallel_size"] = int(topo["data_parallel_size"])
    spec["engine_overrides"] = over
    spec["env"] = {**spec.get("env", {}), **(topo.get("env") or {})}
    return spec


# --- the run --------------------------------------------------------------------------------------
class Run:
    def __init__(self, a, exp, prompts: list[list[int]]):
        self.a, self.exp, self.prompts = a, exp, prompts
        self.samp = {"temperature": exp.eval.temperature, "top_k": exp.eval.top_k, "top_p": exp.eval.top_p}
        self.pools: dict[str, Pool] = {}
        self.res: dict[str, Any] = {}

    def task(self, concurrency: int, tokens: int, greedy: bool) -> dict[str, Any]:
        return {"prompts": self.prompts, "concurrency": concurrency, "max_tokens": tokens, "ignore_eos": True,
                "greedy": greedy, **({} if greedy else self.samp)}

    def write(self) -> None:
        from spark_quant.reporting.paired import plot_curve, render_markdown

        out = Path(self.a.out)
        (out / "paired.json").write_text(json.dumps(self.res, separators=(",", ":"), default=str))
        (out / "paired.md").write_text(render_markdown(self.res))
        if self.res.get("curve", {}).get("levels"):
            plot_curve(self.res, out / "saturation.png")

    def rounds(self, labels: list[str], task: dict[str, Any], n: int, warm: bool) -> list[dict[str, Any]]:
        if warm:
            for lb in labels:
                self.pools[lb].load({**task, "max_tokens": min(task["max_tokens"], 32)})
        out = []
        for r in range(n):
            order = labels if r % 2 == 0 else labels[::-1]
            trials, full = {}, {}
            for lb in order:
                res = self.pools[lb].load(task)
                trials[lb] = trial_metrics(res)
                full[lb] = res
            out.append({"round": r, "order": order, "trials": trials, "t": time.time(), "_full": full})
        return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from spark_quant import spark
    from spark_quant.config import load_experiment
    from spark_quant.envinfo import device_info, git_commit, versions
    from spark_quant.serving.client import serve_python
    from spark_quant.spark.corpus import read_heldout
    from spark_quant.spark.heldout import heldout_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", required=True, type=parse_variant)
    ap.add_argument("--cell", action="append", default=[], type=parse_cell)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--curve", default="", help="labels for the saturation curve (comma-separated)")
    ap.add_argument("--curve-concurrency", default="1,16,64,256,512,1024")
    ap.add_argument("--curve-trials", type=int, default=3)
    ap.add_argument("--curve-tokens", type=int, default=200)
    ap.add_argument("--equivalence", action="append", default=[],
                    help="LABEL,LABEL: greedy outputs of two variants on the same prompts, compared token by token")
    ap.add_argument("--equivalence-tokens", type=int, default=64)
    ap.add_argument("--experiment", type=Path, default=Path("experiments/spark-tts-full_w8a8_int8_gpu.yaml"))
    ap.add_argument("--set", action="append", default=[], help="experiment override, e.g. eval.temperature=0.8")
    ap.add_argument("--gpu-share", type=float, default=None, help="GPU memory share of each engine")
    ap.add_argument("--memory-budget-gib", type=float, default=20.0)
    ap.add_argument("--stream-tokens", type=int, default=None, help="tokens per stream in the memory figure")
    ap.add_argument("--session-module", default=SESSION_MODULE)
    ap.add_argument("--python", default=None, help="the sessions' interpreter (default: SERVE_PYTHON)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--overwrite", action="store_true", help="replace a finished paired run's folder at --out")
    ap.add_argument("--parallel-start", type=float, default=None, metavar="GIB",
                    help="start every engine at once, each with a KV cache of GIB (vLLM's kv_cache_memory_bytes)")
    a = ap.parse_args(argv)
    if a.parallel_start is not None and a.parallel_start <= 0:
        raise UserError(f"--parallel-start {a.parallel_start}: the KV cache of each engine in GiB must be > 0")

    variants = {v["label"]: v for v in a.variant}
    if len(variants) != len(a.variant):
        raise UserError("--variant: labels must be unique")
    curve_labels = [x for x in a.curve.split(",") if x]
    eq_pairs = [p.split(",") for p in a.equivalence]
    for where, labels in [(f"--cell {c['name']}", c["labels"]) for c in a.cell] + [("--curve", curve_labels)] + \
            [("--equivalence", p) for p in eq_pairs]:
        missing = [lb for lb in labels if lb not in variants]
        if missing:
            raise UserError(f"{where}: unknown variant(s) {', '.join(missing)}; defined: {', '.join(variants)}")
    check_not_a_source(a.out, [Path(v["path"]) for v in a.variant], "paired")
    check_writable(a.out, a.overwrite, "paired")  # before any work; live_folder checks again as it claims it
    exp = load_experiment(a.experiment, a.set)
    first = Path(a.variant[0]["path"])
    tok = AutoTokenizer.from_pretrained(str(first))
    if problems := spark.tokenizer_problems(tok.get_vocab()):
        raise UserError(f"{first}: tokenizer is not Spark-TTS's ({problems[0]})")
    texts = read_heldout(exp.eval.heldout, exp.calibration.corpus)
    prompts = [p["ids"] for p in heldout_prompts(texts, exp.eval.num_prompts, tok.encode)]
    n_engines = sum(int(v["topology"].get("replicas", exp.eval.replicas)) for v in a.variant)
    share = a.gpu_share or min(exp.eval.gpu_memory_utilization, 0.9 / n_engines)
    run = Run(a, exp, prompts)
    run.res = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
               "versions": versions(), "host": device_info(), "gpu_memory_gib": gpu_memory_gib(),
               "experiment": str(a.experiment), "sampling": run.samp, "trials": a.trials,
               "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "variants": {}, "cells": {},
               "status": "starting engines"}
    with live_folder(a.out, "paired", a.overwrite, {"argv": sys.argv[1:] if argv is None else argv}):
        (a.out / "logs").mkdir()
        return measure(run, variants, share, a.python or serve_python(), curve_labels, eq_pairs)


def measure(run: Run, variants: dict[str, Any], share: float, python: str, curve_labels: list[str],
            eq_pairs: list[list[str]]) -> int:
    """Start every variant's engines, time the cells and the curve into ``run.res``; 0 when all of it ran."""
    a, exp = run.a, run.exp
    # --parallel-start GIB: every engine's KV cache fixed at GIB (vLLM skips its memory profiling), all launched at once
    kv = fixed_kv_cache(a.parallel_start) if a.parallel_start else {}
    specs = {lb: variant_spec(exp, {**v, "engine": {**kv, **v["engine"]}}, share) for lb, v in variants.items()}
    run.res["start"] = f"parallel, KV cache {a.parallel_start} GiB per engine" if kv else "one engine after another"
    t_start = time.time()
    try:
        for lb, v in variants.items():
            replicas = int(v["topology"].get("replicas", exp.eval.replicas))
            run.pools[lb] = Pool(lb, specs[lb], replicas, a.out / "logs", python, a.session_module, a.timeout)
            print(f"paired: starting {lb} ({replicas} replica(s), share {specs[lb]['gpu_memory_utilization']:.3f})",
                  flush=True)
        started = start_pools(run.pools, parallel=bool(kv), log=lambda m: print(f"paired: {m}", flush=True))
        for lb, v in variants.items():
            engines, spec = started[lb], specs[lb]
            if isinstance(engines, ReplicaError):  # one variant that cannot start does not cost the others their run
                print(f"paired: {lb} FAILED to start: {engines}", file=sys.stderr, flush=True)
                run.res.setdefault("failed_variants", {})[lb] = str(engines)
                del run.pools[lb]
                continue
            run.res["variants"][lb] = {"path": v["path"], "topology": {"replicas": len(engines), **v["topology"]},
                                       "engine_args": spec["engine_overrides"], "max_num_seqs": spec["max_num_seqs"],
                                       "gpu_memory_utilization": spec["gpu_memory_utilization"], "engines": engines}
            took = ", ".join(f"{e['start_s']:.0f}" for e in engines)
            print(f"paired: {lb} ready, start {took} s "
                  f"(weights {engines[0].get('weights_gib')} GiB, KV {engines[0].get('kv_cache_gib')} GiB)", flush=True)
        run.res["engines_started_s"] = round(time.time() - t_start, 1)
        stream_tokens = a.stream_tokens or exp.eval.max_new_tokens
        for lb, v in run.res["variants"].items():
            share_used = None if kv else v["gpu_memory_utilization"]  # a fixed KV cache: the share says nothing
            v["memory"] = memory_row(v["engines"], share_used, run.res["gpu_memory_gib"],
                                     a.memory_budget_gib, int(run.res["prompt_tokens_mean"]) + stream_tokens)
        up = set(run.pools)
        eq_pairs = [p for p in eq_pairs if set(p) <= up]
        curve_labels = [lb for lb in curve_labels if lb in up]
        for pair in eq_pairs:
            run.res.setdefault("equivalence", []).append(equivalence(run, pair, a.equivalence_tokens))
            run.write()
        for cell in a.cell:
            cell = {**cell, "labels": [lb for lb in cell["labels"] if lb in up]}
            if not cell["labels"]:
                continue
            run.res["status"] = f"cell {cell['name']}"
            t0 = time.time()
            raw = run.rounds(cell["labels"], run.task(cell["concurrency"], cell["tokens"], cell["greedy"]),
                             a.trials, warm=True)
            for rnd in raw:
                rnd.pop("_full")
            c = {**cell, "raw": raw, "seconds": round(time.time() - t0, 1)}
            c["stats"] = cell_stats(c)
            run.res["cells"][cell["name"]] = c
            run.write()
            print(f"paired: cell {cell['name']} done in {c['seconds']} s: "
                  + "; ".join(f"{r['of']}/{r['to']} {ci_text(r)} {r['verdict']}"
                              for r in c["stats"]["ratios"] if r["median"] is not None), flush=True)
        if curve_labels:
            levels = []
            run.res["curve"] = {"labels": curve_labels, "tokens": a.curve_tokens, "trials": a.curve_trials,
                                "levels": levels}
            for conc in [int(x) for x in a.curve_concurrency.split(",")]:
                run.res["status"] = f"curve c={conc}"
                raw = run.rounds(curve_labels, run.task(conc, a.curve_tokens, False), a.curve_trials, warm=True)
                lv = {"concurrency": conc, "trials": [{lb: {**rnd["trials"][lb], "requests": rnd["_full"][lb]["requests"]}
                                                       for lb in curve_labels} for rnd in raw]}
                lv["tokens_per_s"] = {lb: stats.median_ci([t[lb]["tokens_per_s"] for t in lv["trials"]])
                                      for lb in curve_labels}
                lv["rtf_p99"] = {lb: stats.percentile([rtf(q) for t in lv["trials"] for q in t[lb]["requests"]], 0.99)
                                 for lb in curve_labels}
                levels.append(lv)
                run.res["curve"]["streams"] = {lb: streams_from_curve(levels, lb) for lb in curve_labels}
                run.write()
                print(f"paired: curve c={conc}: " + "; ".join(
                    f"{lb} {lv['tokens_per_s'][lb]['median']:.0f} tok/s, p99 RTF {lv['rtf_p99'][lb]:.3f}"
                    for lb in curve_labels), flush=True)
        run.res["status"] = "done"
    except ReplicaError as e:
        run.res["status"] = f"failed: {e}"
        print(f"paired: FAILED: {e}", file=sys.stderr, flush=True)
    finally:
        run.res["wall_s"] = round(time.time() - t_start, 1)
        run.write()
        for pool in run.pools.values():
            pool.stop()
    ok = run.res["status"] == "done" and not run.res.get("failed_variants")  # a variant missing is not a full run
    if run.res.get("failed_variants"):
        print(f"paired: not every variant ran: {', '.join(run.res['failed_variants'])} failed to start (paired.md has "
              "why); the others' cells are kept", file=sys.stderr, flush=True)
    print(json.dumps({"ok": ok, "result": str(a.out / "paired.json")}))
    return 0 if ok else 1


def equivalence(run: Run, pair: list[str], tokens: int) -> dict[str, Any]:
    """Greedy outputs of two variants (first replica each) on the same prompts, compared token by token."""
    task = {"name": "eq", "kind": "greedy", "prompts": run.prompts, "max_tokens": tokens, "ignore_eos": True}
    outs = []
    for lb in pair:
        r = run.pools[lb].replicas[0]
        outs.append([o["tokens"] for o in r.receive(r.send([task]), run.a.timeout)["eq"]["outputs"]])
    prefix = []
    for x, y in zip(*outs):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    same = sum(x == y for x, y in zip(*outs))
    return {"pair": pair, "prompts": len(outs[0]), "tokens": tokens, "identical_outputs": same,
            "mean_prefix_agreement": sum(prefix) / len(prefix), "min_prefix_agreement": min(prefix)}


if __name__ == "__main__":
    run_main(main)
