"""BiCodec decode time by chunk length, alone (no LLM beside it).

    python -m spark_quant.audio.bench [--codec DIR] [--tokens 50 100 200] [--n 10] [--out FILE.json]

Without ``--codec`` it uses the model's BiCodec at pretrained_models/Spark-TTS-0.5B if present, else the
embedded random-weight codec (built under build/codec/ if needed). Each length is warmed up once, then
decoded ``n`` times (lengths interleaved); it prints median ms, its 95% bootstrap interval and the
codec's real-time factor, and ends with one JSON line.
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
from spark_quant.reporting.stats import bootstrap_ci


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", type=Path, help="a BiCodec folder (config.yaml + model.safetensors)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--n", type=int, default=10)
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
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({"codec": str(codec.folder), "device": codec.device,
                      "p50_ms": {r["tokens"]: round(r["p50_s"] * 1000, 1) for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
