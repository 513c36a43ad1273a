"""Streaming like a TTS server: chunked BiCodec decoding while the LLM generates.

A request's semantic tokens are cut into chunks as they arrive: the first after
``first_chunk`` tokens (default 50 = 1 s of audio), each later one ``growth`` times the
previous, up to ``max_chunk`` (the official Spark-TTS runtime also streams 1 s first, then
growing chunks); what is left at EOS is the last chunk. Each chunk is decoded with the codec
together with up to ``context`` tokens before it (their samples are cut off again), so chunk
borders see the audio before them. All requests share one codec, run in one worker thread,
first come first served, as a server with one codec instance would; the LLM keeps generating
meanwhile. With ``max_batch`` > 1 that thread decodes the chunks that queued meanwhile in one
batched call (``CodecRunner``).

Per request (times from the moment the request is sent):
- ``first_audio_s``: the first chunk decoded (LLM + codec): time to first audio packet;
- ``codec_s``: codec time spent on its chunks; ``codec_wait_s``: time its chunks queued;
- ``rtf``: time until the last chunk is decoded / audio seconds (LLM + codec);
- underrun: playback starts when the first chunk is ready (plus the plan's ``prebuffer_s``, a client's jitter
  buffer; 0 by default) and plays chunks back to back; a chunk ready after its predecessor ends stalls playback
  (``underrun_s``, ``underruns``). Time to first audio is the first chunk's ready time, without the prebuffer.

``StreamingRequest`` holds the logic and is fed token ids by whoever generates them: the vLLM
engine in ``stream_session``, or saved tokens with their arrival times in tests.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
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
    prebuffer_s: float = 0.0  # the listener's playback starts this long after the first chunk is ready

    def sizes(self):
        """Chunk sizes in semantic tokens: first_chunk, then growing by ``growth`` up to ``max_chunk``."""
        n = self.first_chunk
        while True:
            yield n
            n = min(self.max_chunk, max(n + 1, int(round(n * self.growth))))


def playback(ready: list[float], seconds: list[float], prebuffer: float = 0.0) -> tuple[float, int]:
    """(total stall in s, number of stalls) of playing chunks back to back from the first one's ready time
    (plus ``prebuffer``: a client that waits that long before it starts playing)."""
    if not ready:
        return 0.0, 0
    cursor = ready[0] + prebuffer + seconds[0]
    stall, stalls = 0.0, 0
    for r, s in zip(ready[1:], seconds[1:]):
        if r > cursor + 1e-9:
            stall += r - cursor
            stalls += 1
            cursor = r
        cursor += s
    return stall, stalls


def playback_margin(ready: list[float], seconds: list[float], prebuffer: float = 0.0) -> float | None:
    """The closest call of a played stream: the least time by which a later chunk was ready before playback
    reached it (s; negative = that chunk underran), playing back to back from the first chunk's ready time as
    ``playback`` does. None for a stream of one chunk, which cannot underrun."""
    if len(ready) < 2:
        return None
    cursor, worst = ready[0] + prebuffer + seconds[0], float("inf")
    for r, s in zip(ready[1:], seconds[1:]):
        worst = min(worst, cursor - r)
        cursor = max(cursor, r) + s
    return worst


def _played(req: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    ch = req.get("chunks") or []
    if "skipped" in req or not ch or any("ready_s" not in c for c in ch):
        return None
    return [c["ready_s"] for c in ch], [(c["end"] - c["start"]) / spark.SEMANTIC_PER_SECOND for c in ch]


def request_margin(req: dict[str, Any], prebuffer: float | None = None) -> float | None:
    """``playback_margin`` of a streamed request's record (its chunks' ready times and lengths), with its own
    prebuffer or the one given."""
    played = _played(req)
    pb = req.get("prebuffer_s", 0.0) if prebuffer is None else prebuffer
    return None if played is None else playback_margin(*played, pb)


def request_underrun(req: dict[str, Any], prebuffer: float | None = None) -> tuple[float, int] | None:
    """``playback`` of a streamed request's record, with its own prebuffer or the one given: what a client with
    another prebuffer would have heard of the same chunks (exact where the codec's order did not depend on the
    deadlines that the prebuffer moves: ``fifo``, and ``playing``, which moves every playing stream alike)."""
    played = _played(req)
    pb = req.get("prebuffer_s", 0.0) if prebuffer is None else prebuffer
    return None if played is None else playback(*played, pb)


CODEC_ORDERS = ("fifo", "deadline", "playing")


class CodecRunner:
    """One codec, one worker thread: chunks decode first come first served (``order="fifo"``), earliest
    playback deadline first (``order="deadline"``), or playing streams first (``order="playing"``).

    A chunk's deadline (``run(..., deadline=)``, ``time.perf_counter`` seconds) is when playback reaches it:
    for a stream already playing, its first chunk's ready time plus the audio before the chunk; for a first
    chunk, its submission plus ``first_slack_s`` (so a new stream's first chunk waits behind a playing
    stream's next chunk only while that one is due sooner). A chunk without one counts as due when submitted.
    ``playing`` puts every chunk of a stream whose playback has started (as its ``due`` says when the thread
    picks chunks) before every other, earliest deadline first among them, and the rest after them in arrival
    order:
    under overload a gap in audio that is already playing is what a listener hears, a later start is not
    (2026-12-04's H200 run: with ``deadline`` a new stream's 0.25 s slack beat a playing stream's next chunk,
    and more streams underran than with ``fifo``).
    With ``max_batch`` > 1 the thread takes every chunk that queued while it was busy (up to ``max_batch``,
    in that order) and decodes them in one ``decode_batch`` call, as a server with one codec on a GPU would
    batch them; ``max_batch=1`` decodes one chunk per call. Each chunk's ``codec_s`` is its call's time and
    ``codec_batch`` the number of chunks that call decoded. ``configure`` changes the order and the batch
    between measurements (chunks already queued keep their place)."""

    def __init__(self, decode: Callable[[list[int], list[int]], Any] | None = None, *,
                 decode_batch: Callable[[list[tuple[list[int], list[int]]]], list] | None = None,
                 max_batch: int = 1, order: str = "fifo", first_slack_s: float = 0.25):
        if (decode is None) == (decode_batch is None):
            raise ValueError("CodecRunner needs decode or decode_batch")
        self.decode_batch = decode_batch or (lambda items: [decode(g, s) for g, s in items])
        self._ready = threading.Condition()
        self.max_batch, self.order = 1, "fifo"
        self.configure(order, max_batch)
        self.first_slack_s = first_slack_s
        self.calls: list[int] = []  # chunks per decode call, in order
        self._queue: list[_Job] = []  # in arrival order
        self._seq = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="bicodec", daemon=True)
        self._thread.start()

    def configure(self, order: str | None = None, max_batch: int | None = None) -> None:
        """Set the queue order and the most chunks per call (``None``: keep the current one)."""
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be at least 1")
        if order is not None and order not in CODEC_ORDERS:
            raise ValueError(f"codec order {order!r}: use one of {', '.join(CODEC_ORDERS)}")
        with self._ready:
            self.max_batch = self.max_batch if max_batch is None else int(max_batch)
            self.order = order or self.order

    def _key(self, job: "_Job") -> tuple[float, float]:
        """A queued chunk's place, smallest first, read when the thread picks its next call's chunks (a stream
        starts playing while its later chunks wait, so ``playing`` and the deadline are read then)."""
        if self.order == "fifo":
            return (0.0, job.seq)
        playing, deadline = job.due() if job.due else (False, job.deadline)
        if self.order == "deadline":
            return (0.0, job.submitted if deadline is None else deadline)
        return (0.0, deadline) if playing and deadline is not None else (1.0, job.seq)

    async def run(self, glob: list[int], sem: list[int], deadline: float | None = None,
                  due: Callable[[], tuple[bool, float | None]] | None = None) -> tuple[Any, float, float, int]:
        """(waveform, seconds queued, seconds decoding, chunks in its decode call). ``deadline``: when playback
        reaches the chunk; ``due``, if given, replaces it: a callable answering (is the chunk's stream playing,
        its deadline), asked again each time the thread picks chunks (``StreamingRequest`` passes one)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = _Job(next(self._seq), glob, sem, time.perf_counter(), deadline, due, loop, fut)
        with self._ready:
            self._queue.append(job)
            self._ready.notify()
        return await fut

    def _take(self) -> list["_Job"]:
        """The next call's chunks (the lock held): the first ``max_batch`` in the runner's order."""
        if self.order == "fifo":
            jobs, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            return jobs
        ranked = sorted(range(len(self._queue)), key=lambda i: self._key(self._queue[i]))
        take = set(ranked[: self.max_batch])
        jobs = [self._queue[i] for i in ranked[: self.max_batch]]
        self._queue = [j for i, j in enumerate(self._queue) if i not in take]
        return jobs

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return
                jobs = self._take()
            start = time.perf_counter()
            try:
                wavs, error = self.decode_batch([(j.glob, j.sem) for j in jobs]), None
            except Exception as e:  # noqa: BLE001 - handed to every waiting chunk
                wavs, error = None, e
            took = time.perf_counter() - start
            self.calls.append(len(jobs))
            for k, j in enumerate(jobs):
                result = None if error else (wavs[k], start - j.submitted, took, len(jobs))
                j.loop.call_soon_threadsafe(_settle, j.fut, result, error)

    def calls_since(self, start: int = 0) -> dict[str, int]:
        """The decode calls from index ``start`` of ``calls`` on: how many, their chunks, the largest batch."""
        calls = self.calls[start:]
        return {"n": len(calls), "chunks": sum(calls), "largest_batch": max(calls, default=0)}

    def close(self) -> None:
        """Decode what is queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()


@dataclass
class _Job:
    seq: int
    glob: list[int]
    sem: list[int]
    submitted: float
    deadline: float | None
    due: Callable[[], tuple[bool, float | None]] | None
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


@dataclass
class StreamingRequest:
    """One request's chunking; ``feed`` token ids as they arrive, ``finish`` at the end."""

    mode: str
    plan: ChunkPlan
    runner: CodecRunner
    t0: float
    prompt_globals: list[int] = field(default_factory=list)
    count_all_as_semantic: bool = False  # random proxy: every generated token stands for one semantic token
    header_tokens: int = 0  # with count_all_as_semantic: the first n tokens stand for the mode's header instead
    tokens: list[int] = field(default_factory=list)
    semantic: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    llm_done_s: float | None = None
    _sizes: Any = None
    _emitted: int = 0
    _next: int = 0
    _first_due: float = 0.0
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
                if len(self.tokens) > self.header_tokens:
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

        deadline = self._deadline(start)
        first = self.chunks[0]

        def due() -> tuple[bool, float]:  # asked on the codec thread: has playback started, and when is it due
            if index and "ready_s" in first:
                return True, self.t0 + first["ready_s"] + (start - first["start"]) / spark.SEMANTIC_PER_SECOND
            return False, deadline

        async def decode():
            wav, queued, took, batch = await self.runner.run(glob, sem, deadline, due)
            chunk.update(ready_s=time.perf_counter() - self.t0, codec_wait_s=queued, codec_s=took,
                         codec_batch=batch, samples=int(len(wav)) - (start - ctx) * HOP)

        self.tasks.append(asyncio.ensure_future(decode()))

    def _deadline(self, start: int) -> float:
        """When playback reaches semantic token ``start`` (``time.perf_counter`` seconds): the first chunk's
        ready time (or, while it decodes, its own deadline) plus the audio before; a first chunk: now plus the
        runner's ``first_slack_s``."""
        if not self.chunks or self.chunks[0]["start"] == start:
            self._first_due = time.perf_counter() + self.runner.first_slack_s
            return self._first_due
        first = self.chunks[0]
        t = self.t0 + first["ready_s"] if "ready_s" in first else self._first_due
        return t + self.plan.prebuffer_s + (start - first["start"]) / spark.SEMANTIC_PER_SECOND

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
        ready, secs = _played({"chunks": self.chunks})
        stall, stalls = playback(ready, secs, self.plan.prebuffer_s)
        audio_s = n_sem / spark.SEMANTIC_PER_SECOND
        rec.update(first_audio_s=ready[0], first_chunk_tokens_s=self.chunks[0]["tokens_ready_s"],
                   first_chunk_codec_s=self.chunks[0]["codec_s"], last_audio_s=max(ready), audio_s=audio_s,
                   codec_s=sum(c["codec_s"] for c in self.chunks),
                   codec_wait_s=sum(c["codec_wait_s"] for c in self.chunks),
                   rtf=max(ready) / audio_s, underrun_s=stall, underruns=stalls)
        if self.plan.prebuffer_s:
            rec["prebuffer_s"] = self.plan.prebuffer_s
        return rec


