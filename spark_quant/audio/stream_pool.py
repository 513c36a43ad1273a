"""Streamed TTS on ``eval.replicas`` engine replicas of one checkpoint (1 by default), each with its own codec.

One engine on an H200 writes about 25k tokens/s, half of what 1,024 real-time streams need (50 tokens/s
each), and one codec thread decodes about 190 streams' chunks; a TTS server scales out by running more
engine + codec pairs on the GPU. ``stream_over_replicas`` starts ``replicas`` stream sessions
(``audio.stream_session``) with ``serving.dispatch.Pool`` (one after another: vLLM's start-up memory
profiling needs its neighbours idle), warms each up, then per concurrency level splits the requests round
robin over the replicas and sends all shares at once (after an untimed round at the same load when the stream
spec's ``warm_levels`` is set: on a GPU the first batch of a new size JIT-compiles vLLM's top-k/top-p kernel
inside the timed round, one replica at a time). Concurrency 1 runs its sequential requests on the
first replica. The result: per level a row with every request's record, the ``summary`` over them,
``codec_calls`` summed over the replicas and each replica's wall time; each replica's engine facts
(``engines``); the codec's facts. After each level it is also written to the spec's ``partial_path``.

A paired comparison of codec settings: the stream spec's ``arms`` (``[{"label", "codec_order", "codec_batch",
"codec_graphs"}]``)
and ``rounds``. At each concurrency > 1, every round runs every arm once on the same engines and prompts, the
arms rotated by one each round (A B C, B C A, ...), so the arms are alternated within seconds of each other
and no arm always goes first; each run is a row with its ``arm`` and ``round``. Concurrency 1 runs once, with
the codec's own settings (one stream has nothing to reorder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from spark_quant.audio.stream import CODEC_ORDERS
from spark_quant.reporting.audio import summarize
from spark_quant.serving.dispatch import Pool, ReplicaError, start_pools

MODULE = "spark_quant.audio.stream_session"

# Measured on an H100 80GB (2026-12-06, job gpu9, the full proxy at c = 1,024): an engine held 24.58 GiB at
# share 0.28 (22.17 GiB), so 2.4 GiB beyond its share; a stream session's BiCodec process held 1.6-1.9 GiB.
# Three engines at 0.28 left the codecs 26 MiB and the run died of CUDA OOM at its first c = 1,024 round.
ENGINE_EXTRA_GIB = 2.5
CODEC_GIB = 2.0
# Measured on an H100 (2026-12-06, job gpu12): with CUDA graphs captured (eval.audio_codec_graphs, an arm's
# :graphs) a codec session held 5.3-7.3 GiB, the graph pool beside the eager allocator's blocks; 3 engines of
# 20.4 GiB beside them ran out of memory at c = 1,024.
CODEC_GRAPHS_GIB = 8.0


def uses_graphs(stream: dict[str, Any]) -> bool:
    """Whether a stream spec's codec captures CUDA graphs: its own ``codec_graphs`` or any arm's."""
    return bool(stream.get("codec_graphs")) or any(a.get("codec_graphs") for a in stream.get("arms") or [])


def most_engine_gib(replicas: int, total_gib: float, codec_gib: float = CODEC_GIB) -> float:
    """The most GPU memory each of ``replicas`` engines may take and still leave its codec session room."""
    return total_gib / replicas - ENGINE_EXTRA_GIB - codec_gib


def fitting_share(share: float, replicas: int, total_gib: float | None, codec_gib: float = CODEC_GIB) -> float:
    """``share`` (an engine's ``gpu_memory_utilization``), lowered where ``replicas`` engines at it would leave
    their codec sessions too little of a ``total_gib`` GPU (unknown: ``share`` as given); ValueError when no
    share fits."""
    if not total_gib:
        return share
    most = most_engine_gib(replicas, total_gib, codec_gib)
    if most <= 0:
        raise ValueError(f"{replicas} engine + codec sessions do not fit a {total_gib:.1f} GiB GPU; "
                         "set fewer eval.replicas")
    return min(share, most / total_gib)


def engine_memory_share(text: str, replicas: int, total_gib: float, codec_gib: float = CODEC_GIB) -> float:
    """Each engine's ``gpu_memory_utilization`` from ``--memory``: ``0.28`` (a share of the GPU) or ``18GiB``
    (an amount, the same engine on any card). Refuses, with a one-line ValueError, a plan whose ``replicas``
    engines leave their codec sessions less than they need (``ENGINE_EXTRA_GIB`` + ``codec_gib`` each:
    ``CODEC_GRAPHS_GIB`` where the codec captures CUDA graphs)."""
    t = text.strip()
    try:
        gib = float(t[:-3]) if t.lower().endswith("gib") else None
        share = gib / total_gib if gib is not None else float(t)
    except ValueError:
        raise ValueError(f"--memory {text!r}: give a share of the GPU (0.28) or an amount per engine (18GiB)") from None
    if not 0.0 < share <= 0.95:
        raise ValueError(f"--memory {text!r} is {share:.3f} of the {total_gib:.1f} GiB GPU; it must be in (0, 0.95]")
    need = replicas * (share * total_gib + ENGINE_EXTRA_GIB + codec_gib)
    if need > total_gib:
        most = most_engine_gib(replicas, total_gib, codec_gib)
        hint = f"pass --memory {math.floor(most)}GiB or less" if most >= 1 else "pass fewer --replicas"
        raise ValueError(f"--memory {text!r}: {replicas} engine(s) of {share * total_gib:.1f} GiB with their codec "
                         f"sessions need about {need:.1f} GiB of the GPU's {total_gib:.1f} GiB; {hint}")
    return share


def merge_calls(parts: list[dict[str, Any]]) -> dict[str, int]:
    calls = [p["codec_calls"] for p in parts]
    return {"n": sum(c["n"] for c in calls), "chunks": sum(c["chunks"] for c in calls),
            "largest_batch": max((c["largest_batch"] for c in calls), default=0)}


def arm_task(arm: dict[str, Any] | None) -> dict[str, Any]:
    """The task keys of a codec arm (``{"label", "codec_order", "codec_batch", "codec_graphs"}``); none without one."""
    return ({} if arm is None else
            {k: arm[k] for k in ("codec_order", "codec_batch", "codec_graphs") if arm.get(k) is not None})


def parse_arms(text: str) -> list[dict]:
    """``fifo:16,playing:64,playing:16:graphs`` -> the stream spec's arms (``audio.stream_pool``): ORDER:BATCH,
    ``:graphs`` to decode through CUDA graphs; a bad item is a one-line error."""
    arms = []
    for item in text.split(","):
        order, batch, *rest = item.strip().split(":") + ([""] if ":" not in item else [])
        if (order not in CODEC_ORDERS or not batch.isdigit() or int(batch) < 1 or rest not in ([], ["graphs"])):
            raise ValueError(f"--arms: {item!r} is not ORDER:BATCH[:graphs] (ORDER one of {', '.join(CODEC_ORDERS)}, "
                             "BATCH >= 1)")
        graphs = rest == ["graphs"]
        arms.append({"label": f"{order}-{batch}" + ("-graphs" if graphs else ""), "codec_order": order,
                     "codec_batch": int(batch), "codec_graphs": graphs})
    if len({x["label"] for x in arms}) != len(arms):
        raise ValueError(f"--arms: {text!r} names an arm twice")
    return arms


def stream_over_replicas(spec: dict[str, Any], replicas: int, workdir: Path, python: str, tag: str,
                         timeout_s: float, module: str = MODULE, parallel: bool = False) -> dict[str, Any]:
    """The stream measurement of ``spec`` (a stream worker spec) on ``replicas`` sessions; never raises for a
    replica that fails: the result says ``ok: False`` with the error and keeps the levels already done.
    ``parallel``: the sessions start at once (``dispatch.start_pools``; the spec's engine needs a fixed KV cache,
    ``kv_cache_memory_bytes``)."""
    st = spec["stream"]
    pools = {tag: Pool(tag, spec, replicas, Path(workdir), python, module=module, timeout_s=timeout_s)}
    pool = pools[tag]
    res: dict[str, Any] = {"ok": False, "replicas": replicas, "rows": []}
    arms = [dict(a) for a in st.get("arms") or []]
    rounds = int(st.get("rounds", 1)) if arms else 1
    arms = arms or [None]
    partial = Path(st["partial_path"]) if st.get("partial_path") else None
    try:
        got = start_pools(pools, parallel, log=lambda m: print(f"stream: {m}", flush=True))[tag]
        pool = pools[tag]  # a pool that failed beside its neighbours was started again on its own
        if isinstance(got, ReplicaError):
            raise got
        res["engines"] = got
        res["engine"] = res["engines"][0]
        warm = pool.broadcast([{"name": "warm", "kind": "stream", "concurrency": 1, "requests": 1}])
        res.update({k: v for k, v in warm[0]["warm"].items()
                    if k in ("codec", "plan", "codec_batch", "codec_order", "count_all_as_semantic")})
        for c in st["concurrency"]:
            warm_wall = None
            if c == 1:
                first = pool.replicas[0]
                rid = first.send([{"name": "part", "kind": "stream", "concurrency": 1, "requests": st["requests"]}])
                parts = [first.receive(rid, timeout_s)["part"]]
                wall = parts[0]["wall_s"]
                runs = [(None, None, parts, wall)]
            else:
                if st.get("warm_levels"):  # an untimed round at this load first: vLLM JIT-compiles its top-k/top-p
                    _, warm_wall = pool.spread({"kind": "stream", "concurrency": c,  # kernel per new batch shape
                                                **arm_task(arms[0])})
                runs = []
                for rnd in range(rounds):  # the arms alternated, each round starting one arm further on
                    for arm in arms[rnd % len(arms):] + arms[: rnd % len(arms)]:
                        parts, wall = pool.spread({"kind": "stream", "concurrency": c, **arm_task(arm)})
                        runs.append((arm, rnd, parts, wall))
            for arm, rnd, parts, wall in runs:
                recs = [r for p in parts for r in p["requests"]]
                row = {"concurrency": c, "wall_s": wall, "replica_wall_s": [p["wall_s"] for p in parts],
                       "warm_wall_s": warm_wall, "codec_calls": merge_calls(parts),
                       "summary": summarize(recs), "requests": recs}
                if arm is not None:
                    row.update(arm=arm["label"], round=rnd, codec_order=parts[0].get("codec_order"),
                               codec_batch=parts[0].get("codec_batch"), codec_graphs=parts[0].get("codec_graphs"))
                res["rows"].append(row)
            if partial:
                partial.write_text(json.dumps({**res, "ok": True, "partial": True}))
        res["ok"] = True
    except ReplicaError as e:
        res["error"] = str(e)
    except OSError as e:  # the serving interpreter cannot be started at all
        res["error"] = f"{python}: cannot start the stream session ({e.strerror or e}); set SERVE_PYTHON"
    finally:
        pool.stop()
    return res
