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
from spark_quant.reporting.speed_stats import median_ci, paired_ratio
from spark_quant.reporting.stats import bootstrap_ci


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", type=Path, help="a BiCodec folder (config.yaml + model.safetensors)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="also time B chunks in one batched call against B calls")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    folder = args.codec or resolve_codec_dir(REAL_MODEL_DIR if (REAL_MODEL_DIR / "BiCodec").exists() else None)[0]
    codec = load_bicodec(folder, device=args.device)
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
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
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

        def ci(d):
            return (f"{d['median']:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]" if d["lo"] is not None
                    else f"{d['median']:.1f} (n < 3)")

        r = (f"{ratio['median']:.2f} [{ratio['lo']:.2f}, {ratio['hi']:.2f}] {ratio['verdict']}"
             if ratio["lo"] is not None else f"{ratio['median']:.2f} ({ratio['verdict']})")
        print(f"| {length} | {b} | {n} | {ci(one)} | {ci(many)} | {r} |")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
