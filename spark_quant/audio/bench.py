"""BiCodec decode time by chunk length, alone (no LLM beside it).

    python -m spark_quant.audio.bench [--codec DIR] [--tokens 50 100 200] [--n 10] [--batch 8] [--out FILE.json]

Without ``--codec`` it uses the model's BiCodec at pretrained_models/Spark-TTS-0.5B if present, else the
embedded random-weight codec (built under build/codec/ if needed). Each length is warmed up once, then
decoded ``n`` times (lengths interleaved); it prints median ms, its 95% bootstrap interval and the
codec's real-time factor, and ends with one JSON line.

``--batch B`` adds the batched measurement a streaming server's codec thread relies on: per length,
``n`` paired trials, each decoding B different chunks once as B calls and once as one ``decode_batch``
call (the order alternating trial by trial). It reports each way's codec throughput (seconds of audio
decoded per second: the real-time streams one codec thread keeps up with) and the paired ratio
batched / one-by-one with its 95% interval and n.

``--graphs B [B ...]`` (CUDA): per length and batch B, ``n`` paired trials of B chunks in one ``decode_batch``
call eagerly and through CUDA graphs (alternating), each way's throughput and the paired ratio graphs /
eager, plus the largest difference between the two waveforms. ``--profile`` adds one eager pass per length
and batch under ``torch.profiler``: the GPU's kernel time against the pass's wall time and the kernel count
(what is left of the wall is launch and host time, the part graphs remove).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from spark_quant.audio.codec import codec_info, load_bicodec, resolve_codec_dir
from spark_quant.config import REAL_MODEL_DIR
from spark_quant.outputs import check_result_file, write_result_file
from spark_quant.reporting.fmt import ci_text
from spark_quant.reporting.speed_stats import median_ci, paired_ratio
from spark_quant.reporting.stats import bootstrap_ci


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", type=Path, help="a BiCodec folder (config.yaml + model.safetensors)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="also time B chunks in one batched call against B calls")
    ap.add_argument("--graphs", type=int, nargs="*", default=[], metavar="B",
                    help="also time CUDA-graph decoding against eager at these batch sizes")
    ap.add_argument("--profile", action="store_true", help="GPU kernel time of one eager pass per length")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier result of this bench at --out")
    args = ap.parse_args(argv)
    if args.out:
        check_result_file(args.out, "audio.bench", args.overwrite)
    if (args.graphs or args.profile) and (args.device or "cuda") != "cuda":
        raise SystemExit("bench: --graphs and --profile time the codec on a GPU; leave --device out or pass cuda")
    folder = args.codec or resolve_codec_dir(REAL_MODEL_DIR if (REAL_MODEL_DIR / "BiCodec").exists() else None)[0]
    codec = load_bicodec(folder, device=args.device)
    if (args.graphs or args.profile) and codec.device != "cuda":
        raise SystemExit("bench: --graphs and --profile need a CUDA GPU; this machine has none")
    rng = random.Random(0)
    glob = [rng.randrange(4096) for _ in range(32)]
    sems = {n: [rng.randrange(8192) for _ in range(n)] for n in args.tokens}
    for n in args.tokens:  # warm-up
        codec.decode(glob, sems[n])
    times: dict[int, list[float]] = {n: [] for n in args.tokens}
    for _ in range(args.n):
        for n in args.tokens:
            t0 = time.perf_counter()
            codec.decode(glob, sems[n])
            times[n].append(time.perf_counter() - t0)
    rows = []
    print(f"codec: {codec.folder} on {codec.device}" + (" (random weights)" if codec.random_weights else ""))
    print("| semantic tokens | audio s | n | decode ms p50 [95% CI] | codec RTF |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        p50 = statistics.median(times[n])
        lo, hi = bootstrap_ci(times[n])
        rows.append({"tokens": n, "audio_s": n / 50, "n": len(times[n]), "p50_s": p50, "ci95_s": [lo, hi],
                     "rtf": p50 / (n / 50), "raw_s": times[n]})
        print(f"| {n} | {n / 50:.1f} | {len(times[n])} | {p50 * 1000:.0f} [{lo * 1000:.0f}, {hi * 1000:.0f}] | "
              f"{p50 / (n / 50):.2f} |")
    res = {"codec": codec_info(codec), "rows": rows}
    if args.batch > 1:
        res["batched"] = batched(codec, args.tokens, args.batch, args.n, rng)
    if args.graphs:
        res["graphs"] = graphs_vs_eager(codec, args.tokens, args.graphs, args.n, rng)
        res["codec"]["cuda_graphs"] = codec.graph_info()
    if args.profile:
        res["profile"] = [profile_pass(codec, n, b, rng) for n in args.tokens for b in sorted({1, *args.graphs})]
    if args.out:
        write_result_file(args.out, res, "audio.bench", args.overwrite)
    print(json.dumps({"codec": str(codec.folder), "device": codec.device,
                      "p50_ms": {r["tokens"]: round(r["p50_s"] * 1000, 1) for r in rows}}))
    return 0


def batched(codec, lengths: list[int], b: int, n: int, rng: random.Random) -> list[dict]:
    """Paired trials per length: B chunks as B ``decode`` calls and as one ``decode_batch`` call."""
    rows = []
    print("\n| semantic tokens | chunks | n | one by one: audio s/s [95% CI] | batched: audio s/s [95% CI] | "
          "batched / one by one [95% CI] |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        items = [([rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(length)])
                 for _ in range(b)]
        codec.decode_batch(items)  # warm-up of the batch shape
        audio = b * length / 50
        seq, bat = [], []
        for trial in range(n):
            for way in (("seq", "bat") if trial % 2 == 0 else ("bat", "seq")):
                t0 = time.perf_counter()
                if way == "seq":
                    for g, s in items:
                        codec.decode(g, s)
                else:
                    codec.decode_batch(items)
                (seq if way == "seq" else bat).append(audio / (time.perf_counter() - t0))
        one, many = median_ci(seq), median_ci(bat)
        ratio = paired_ratio(seq, bat, higher_is_better=True)
        rows.append({"tokens": length, "chunks": b, "one_by_one_audio_s_per_s": one, "batched_audio_s_per_s": many,
                     "ratio": ratio, "raw": {"one_by_one": seq, "batched": bat}})
        print(f"| {length} | {b} | {n} | {_ci(one)} | {_ci(many)} | {_ratio(ratio)} |")
    return rows


def _ci(d: dict) -> str:
    return ci_text(d, ".1f", " (n < 3)")


def _ratio(r: dict) -> str:
    return ci_text(r, ".2f", f" ({r['verdict']})") if r["lo"] is None else f"{ci_text(r, '.2f')} {r['verdict']}"


def graphs_vs_eager(codec, lengths: list[int], batches: list[int], n: int, rng: random.Random) -> list[dict]:
    """Paired trials per (length, batch): one ``decode_batch`` call eagerly and through CUDA graphs."""
    import numpy as np

    rows = []
    print("\n| semantic tokens | chunks | n | eager: audio s/s [95% CI] | graphs: audio s/s [95% CI] | "
          "graphs / eager [95% CI] | max abs diff / peak |")
    print("|---|---|---|---|---|---|---|")
    for length in lengths:
        for b in batches:
            items = [([rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(length)])
                     for _ in range(b)]
            codec.use_graphs(False)
            ref = codec.decode_batch(items)
            codec.use_graphs(True)
            codec.prepare_graphs([length], b)
            got = codec.decode_batch(items)
            diff = max(float(np.abs(x - y).max()) for x, y in zip(ref, got))
            peak = max(float(np.abs(x).max()) for x in ref)
            audio = b * length / 50
            eager, graph = [], []
            for trial in range(n):
                for way in (("eager", "graphs") if trial % 2 == 0 else ("graphs", "eager")):
                    codec.use_graphs(way == "graphs")
                    t0 = time.perf_counter()
                    codec.decode_batch(items)
                    (graph if way == "graphs" else eager).append(audio / (time.perf_counter() - t0))
            codec.use_graphs(False)
            ratio = paired_ratio(eager, graph, higher_is_better=True)
            one, many = median_ci(eager), median_ci(graph)
            rows.append({"tokens": length, "chunks": b, "eager_audio_s_per_s": one, "graphs_audio_s_per_s": many,
                         "ratio": ratio, "max_abs_diff": diff, "peak": peak, "raw": {"eager": eager, "graphs": graph}})
            print(f"| {length} | {b} | {n} | {_ci(one)} | {_ci(many)} | {_ratio(ratio)} | {diff:.2e} / {peak:.2f} |")
    return rows


def profile_pass(codec, length: int, b: int, rng: random.Random) -> dict:
    """One eager pass of ``b`` chunks of ``length`` tokens under torch.profiler: GPU kernel time and count."""
    from torch.profiler import ProfilerActivity, profile

    items = [([rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(length)]) for _ in range(b)]
    graphs = codec.graphs
    codec.use_graphs(False)
    codec.decode_batch(items)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # main() refused a CPU codec
        t0 = time.perf_counter()
        codec.decode_batch(items)
        wall = time.perf_counter() - t0
    codec.use_graphs(graphs)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]  # kernels and copies on the GPU
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    row = {"tokens": length, "chunks": b, "wall_s": wall, "kernel_s": busy, "kernels": len(kernels),
           "kernel_share": busy / wall if wall else None}
    print(f"profile: {b} x {length} tokens: wall {wall * 1000:.1f} ms, GPU kernels {busy * 1000:.1f} ms "
          f"({len(kernels)} kernels, {row['kernel_share']:.0%} of the wall)")
    return row


if __name__ == "__main__":
    from spark_quant.errors import run_main

    run_main(main)
