"""Streaming like a TTS server: chunked BiCodec decoding while the LLM generates.

A request's semantic tokens are cut into chunks as they arrive: the first after
``first_chunk`` tokens (default 50 = 1 s of audio), each later one ``growth`` times the
previous, up to ``max_chunk`` (the official Spark-TTS runtime also streams 1 s first, then
growing chunks); what is left at EOS is the last chunk. Each chunk is decoded with the codec
together with up to ``context`` tokens before it (their samples are cut off again), so chunk
borders see the audio before them. All requests share one codec, run in one worker thread,
first come first served, as a server with one codec instance would; the LLM keeps generating
meanwhile.

Per request (times from the moment the request is sent):
- ``first_audio_s``: the first chunk decoded (LLM + codec): time to first audio packet;
- ``codec_s``: codec time spent on its chunks; ``codec_wait_s``: time its chunks queued;
- ``rtf``: time until the last chunk is decoded / audio seconds (LLM + codec);
- underrun: playback starts when the first chunk is ready and plays chunks back to back;
  a chunk ready after its predecessor ends stalls playback (``underrun_s``, ``underruns``).

``StreamingRequest`` holds the logic and is fed token ids by whoever generates them: the vLLM
engine in ``stream_worker``, or saved tokens with their arrival times in tests.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from spark_quant import spark

HOP = 320  # samples per semantic token


@dataclass(frozen=True)
class ChunkPlan:
    first_chunk: int = 50
    growth: float = 2.0
    max_chunk: int = 200
    context: int = 10

    def sizes(self):
        """Chunk sizes in semantic tokens: first_chunk, then growing by ``growth`` up to ``max_chunk``."""
        n = self.first_chunk
        while True:
            yield n
            n = min(self.max_chunk, max(n + 1, int(round(n * self.growth))))


def playback(ready: list[float], seconds: list[float]) -> tuple[float, int]:
    """(total stall in s, number of stalls) of playing chunks back to back from the first one's ready time."""
    if not ready:
        return 0.0, 0
    cursor = ready[0] + seconds[0]
    stall, stalls = 0.0, 0
    for r, s in zip(ready[1:], seconds[1:]):
        if r > cursor + 1e-9:
            stall += r - cursor
            stalls += 1
            cursor = r
        cursor += s
    return stall, stalls


class CodecRunner:
    """One codec, one worker thread: chunks decode first come first served."""

    def __init__(self, decode: Callable[[list[int], list[int]], Any]):
        self.decode = decode
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bicodec")

    async def run(self, glob: list[int], sem: list[int]) -> tuple[Any, float, float]:
        """(waveform, seconds queued, seconds decoding)."""
        submitted = time.perf_counter()

        def job():
            start = time.perf_counter()
            wav = self.decode(glob, sem)
            return wav, start - submitted, time.perf_counter() - start

        return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class StreamingRequest:
    """One request's chunking; ``feed`` token ids as they arrive, ``finish`` at the end."""

    mode: str
    plan: ChunkPlan
    runner: CodecRunner
    t0: float
    prompt_globals: list[int] = field(default_factory=list)
    count_all_as_semantic: bool = False  # random proxy: every generated token stands for one semantic token
    tokens: list[int] = field(default_factory=list)
    semantic: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    llm_done_s: float | None = None
    _sizes: Any = None
    _emitted: int = 0
    _next: int = 0
    skipped: str | None = None

    def __post_init__(self):
        self._sizes = self.plan.sizes()
        self._next = next(self._sizes)

    def globals(self) -> list[int]:
        if self.mode == "clone" or self.count_all_as_semantic:
            return self.prompt_globals
        g0 = spark.RANGE_START["bicodec_global"]
        return [t - g0 for t in self.tokens if spark.is_global_id(t)][: spark.N_GLOBAL]

    def feed(self, new_ids: list[int]) -> None:
        s0 = spark.RANGE_START["bicodec_semantic"]
        for t in new_ids:
            if t == spark.EOS_ID and not self.count_all_as_semantic:
                break
            self.tokens.append(t)
            if self.count_all_as_semantic:
                self.semantic.append(t % spark.SEMANTIC_CODEBOOK)
            elif spark.is_semantic_id(t):
                self.semantic.append(t - s0)
        while len(self.semantic) - self._emitted >= self._next:
            self._emit(self._emitted + self._next)
            self._next = next(self._sizes)

    def finish(self) -> None:
        self.llm_done_s = time.perf_counter() - self.t0
        if len(self.semantic) > self._emitted:
            self._emit(len(self.semantic))

    def _emit(self, end: int) -> None:
        start = self._emitted
        self._emitted = end
        glob = self.globals()
        if len(glob) != spark.N_GLOBAL:
            self.skipped = f"{len(glob)} global tokens before the first chunk (need {spark.N_GLOBAL})"
            return
        ctx = max(0, start - self.plan.context)
        sem = self.semantic[ctx:end]
        arrived = time.perf_counter() - self.t0
        index = len(self.chunks)
        chunk = {"index": index, "start": start, "end": end, "context": start - ctx, "tokens_ready_s": arrived}
        self.chunks.append(chunk)

        async def decode():
            wav, queued, took = await self.runner.run(glob, sem)
            chunk.update(ready_s=time.perf_counter() - self.t0, codec_wait_s=queued, codec_s=took,
                         samples=int(len(wav)) - (start - ctx) * HOP)

        self.tasks.append(asyncio.ensure_future(decode()))

    async def done(self) -> dict[str, Any]:
        await asyncio.gather(*self.tasks)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        n_sem = len(self.semantic)
        rec: dict[str, Any] = {"mode": self.mode, "semantic_tokens": n_sem, "generated_tokens": len(self.tokens),
                               "llm_done_s": self.llm_done_s, "chunks": self.chunks}
        if self.skipped or not self.chunks:
            rec["skipped"] = self.skipped or "no semantic tokens"
            return rec
        ready = [c["ready_s"] for c in self.chunks]
        secs = [(c["end"] - c["start"]) / spark.SEMANTIC_PER_SECOND for c in self.chunks]
        stall, stalls = playback(ready, secs)
        audio_s = n_sem / spark.SEMANTIC_PER_SECOND
        rec.update(first_audio_s=ready[0], first_chunk_tokens_s=self.chunks[0]["tokens_ready_s"],
                   first_chunk_codec_s=self.chunks[0]["codec_s"], last_audio_s=max(ready), audio_s=audio_s,
                   codec_s=sum(c["codec_s"] for c in self.chunks),
                   codec_wait_s=sum(c["codec_wait_s"] for c in self.chunks),
                   rtf=max(ready) / audio_s, underrun_s=stall, underruns=stalls)
        return rec


def bootstrap_ci(xs: list[float], stat: str = "median", level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile-bootstrap interval of the median (or mean) with scipy.stats.bootstrap; (None, None) under n=2."""
    import numpy as np
    from scipy.stats import bootstrap

    xs = [x for x in xs if x is not None]
    if len(xs) < 2 or len(set(xs)) < 2:
        return (xs[0], xs[0]) if xs and len(set(xs)) == 1 and len(xs) >= 2 else (None, None)
    fn = np.median if stat == "median" else np.mean
    r = bootstrap((np.asarray(xs, dtype=float),), fn, confidence_level=level, n_resamples=2000,
                  method="percentile", random_state=np.random.default_rng(0))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def _stat(xs: list[float]) -> dict[str, Any]:
    import statistics

    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "p50": None, "ci95": [None, None], "p90": None, "max": None}
    s = sorted(xs)
    lo, hi = bootstrap_ci(xs)
    return {"n": len(xs), "p50": statistics.median(xs), "ci95": [lo, hi],
            "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))], "max": s[-1]}


def summarize(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode and overall statistics of streamed requests: p50 with a 95% bootstrap interval."""
    ok = [r for r in requests if "skipped" not in r]
    out: dict[str, Any] = {"requests": len(requests), "decoded": len(ok),
                           "skipped": [r["skipped"] for r in requests if "skipped" in r]}
    groups = {"all": ok, **{m: [r for r in ok if r["mode"] == m] for m in sorted({r["mode"] for r in ok})}}
    for name, rs in groups.items():
        codec = sum(r["codec_s"] for r in rs)
        wall = sum(r["last_audio_s"] for r in rs)
        out[name] = {
            "first_audio_s": _stat([r["first_audio_s"] for r in rs]),
            "first_chunk_tokens_s": _stat([r["first_chunk_tokens_s"] for r in rs]),
            "first_chunk_codec_s": _stat([r["first_chunk_codec_s"] for r in rs]),
            "rtf": _stat([r["rtf"] for r in rs]),
            "codec_rtf": _stat([r["codec_s"] / r["audio_s"] for r in rs]),
            "audio_s": _stat([r["audio_s"] for r in rs]),
            "underrun_s": _stat([r["underrun_s"] for r in rs]),
            "requests_with_underrun": sum(1 for r in rs if r["underruns"]),
            "codec_share_of_first_audio": (sum(r["first_chunk_codec_s"] for r in rs)
                                           / sum(r["first_audio_s"] for r in rs)) if rs else None,
            "codec_share_of_request": codec / wall if wall else None,
        }
    return out


def _ms(s: dict[str, Any] | None, key: str = "p50") -> str:
    v = (s or {}).get(key)
    return "–" if v is None else f"{v * 1000:.0f}"


def _ci_ms(s: dict[str, Any]) -> str:
    lo, hi = s.get("ci95") or [None, None]
    return "" if lo is None else f" [{lo * 1000:.0f}, {hi * 1000:.0f}]"


def stream_table(models: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: time to first audio (LLM part, codec part), RTF with the codec, underrun."""
    lines = ["| model | c | mode | n | first audio p50 ms [95% CI] | LLM to 1st chunk ms | codec 1st chunk ms | "
             "codec share of 1st audio | RTF p50 (LLM+codec) [95% CI] | codec RTF | requests with underrun | "
             "underrun p50 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    label = {"baseline": "BF16", "quantized": "INT8"}
    for name, m in models.items():
        if not m.get("ok"):
            lines.append(f"| {label.get(name, name)} | – | – | – | failed: {m.get('error')} | | | | | | | |")
            continue
        for row in m["rows"]:
            summ = row["summary"]
            for mode in [k for k in ("all", "controllable", "clone") if k in summ]:
                s = summ[mode]
                n = s["first_audio_s"]["n"]
                if not n:
                    continue
                rtf = s["rtf"]
                share = s["codec_share_of_first_audio"]
                rtf_ci = "" if rtf["ci95"][0] is None else f" [{rtf['ci95'][0]:.2f}, {rtf['ci95'][1]:.2f}]"
                lines.append(
                    f"| {label.get(name, name)} | {row['concurrency']} | {mode} | {n} | "
                    f"{_ms(s['first_audio_s'])}{_ci_ms(s['first_audio_s'])} | {_ms(s['first_chunk_tokens_s'])} | "
                    f"{_ms(s['first_chunk_codec_s'])} | {'–' if share is None else f'{share:.0%}'} | "
                    f"{rtf['p50']:.2f}{rtf_ci} | {s['codec_rtf']['p50']:.2f} | "
                    f"{s['requests_with_underrun']}/{n} | {_ms(s['underrun_s'])} |")
    return lines


def render_markdown(res: dict[str, Any]) -> list[str]:
    lines = ["## Streamed audio: time to first audio with BiCodec", ""]
    if res.get("skipped_all"):
        return lines + [f"Not measured: {res['skipped_all']}", ""]
    plan = res["plan"]
    codec = next((m["codec"] for m in res["models"].values() if m.get("ok")), None)
    lines += [f"Tokens: {res['token_source']}. First chunk after {plan.get('first_chunk', 50)} semantic tokens, "
              "later chunks twice the previous (at most 200), each decoded with 10 tokens of left context by one "
              "codec thread shared by all requests while the LLM generates. First audio = request sent to first "
              "chunk decoded (LLM + codec). Underrun: playback from the first chunk on stalls for a later one. "
              f"{res['requests_at_c1']} sequential requests at c=1; c requests at once above.", ""]
    if codec:
        lines += [f"Codec: {codec['implementation']} on {codec['device']}"
                  + (" (**random weights**: timing only)" if codec["random_weights"] else ""), ""]
    return lines + stream_table(res["models"]) + [""]
