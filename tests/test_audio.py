"""BiCodec decoding, WAV samples, the HTML page and streamed first audio (spark_quant/audio/), on the CPU.

The codec is the embedded one (Spark-TTS's BiCodec architecture and config, random weights from a
seed): build/codec's copy if `make` built it, else built here. Outputs are saved token lists in
Spark's grammar, so no vLLM engine starts except in the one e2e test at the end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import shutil
import subprocess
import wave
from pathlib import Path

import pytest

from spark_quant import spark
from spark_quant.errors import UserError
from spark_quant.reporting.audio import render_stream, summarize

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("torch")
if importlib.util.find_spec("spark_tts_lib") is None:  # not imported: its __init__ needs torchaudio (see codec.py)
    pytest.skip("codec modules: pip install --no-deps spark-tts-lib einops einx", allow_module_level=True)


@pytest.fixture(scope="session")
def codec_dir(tmp_path_factory) -> Path:
    from spark_quant.audio.codec import _is_built, build_embedded_codec, embedded_codec_dir

    cached = embedded_codec_dir(ROOT / "build", 0)
    if _is_built(cached, 0):  # read only
        return cached / "BiCodec"
    return build_embedded_codec(tmp_path_factory.mktemp("codec") / "Spark-TTS-BiCodec-random-s0", 0)


@pytest.fixture(scope="session")
def codec(codec_dir):
    from spark_quant.audio.codec import load_bicodec

    return load_bicodec(codec_dir, device="cpu")


GLOBALS = [(7 * i + 3) % spark.GLOBAL_CODEBOOK for i in range(32)]


def controllable_output(n_sem: int, eos: bool = True) -> list[int]:
    """Generated ids in Spark's controllable-mode grammar: header, 32 globals, n_sem semantic tokens, EOS."""
    t = spark.token_id
    ids = [t("<|start_acoustic_token|>"), t("<|pitch_value_300|>"), t("<|speed_value_5|>"),
           t("<|end_acoustic_token|>"), t("<|start_global_token|>")]
    ids += [spark.global_id(g) for g in GLOBALS] + [t("<|end_global_token|>"), t("<|start_semantic_token|>")]
    ids += [spark.semantic_id((13 * i) % spark.SEMANTIC_CODEBOOK) for i in range(n_sem)]
    return ids + ([spark.EOS_ID] if eos else [])


def clone_output(n_sem: int) -> list[int]:
    return [spark.token_id("<|start_semantic_token|>")] + \
        [spark.semantic_id((29 * i) % spark.SEMANTIC_CODEBOOK) for i in range(n_sem)] + [spark.EOS_ID]


def prompts_and_runs():
    """Two prompts per mode and both models' greedy outputs; INT8's second controllable output is empty."""
    clone_prompt_ids = [spark.token_id("<|task_tts|>"), spark.token_id("<|start_global_token|>")] + \
        [spark.global_id(g) for g in GLOBALS] + [spark.token_id("<|end_global_token|>")]
    prompts = [{"mode": "controllable", "text": "Hello there.", "ids": [1, 2, 3]},
               {"mode": "controllable", "text": "A second | line.", "ids": [4, 5]},
               {"mode": "clone", "text": "Clone me.", "ids": clone_prompt_ids},
               {"mode": "clone", "text": "Clone me again.", "ids": clone_prompt_ids},
               {"mode": "clone", "text": "not picked", "ids": clone_prompt_ids}]
    base = [controllable_output(60), controllable_output(25), clone_output(40), clone_output(51), clone_output(5)]
    quant = [controllable_output(55), controllable_output(0), clone_output(40), clone_output(48), clone_output(5)]
    runs = {name: [{"ok": True, "tasks": {"greedy": {"outputs": [{"tokens": t} for t in outs]}}}]
            for name, outs in (("baseline", base), ("quantized", quant))}
    return prompts, runs


# --- the codec ------------------------------------------------------------------------
def test_embedded_codec_has_spark_layout_config_and_random_weights_marker(codec_dir, codec):
    import yaml

    from spark_quant.audio.codec import BICODEC_CONFIG

    assert sorted(p.name for p in codec_dir.iterdir()) == ["config.yaml", "model.safetensors"]
    assert yaml.safe_load((codec_dir / "config.yaml").read_text()) == BICODEC_CONFIG
    marker = json.loads((codec_dir.parent / "CODEC.json").read_text())
    assert marker["random_init"] is True and marker["seed"] == 0
    assert codec.random_weights is True
    assert 150e6 < codec.parameters < 160e6  # BiCodec's size (model.safetensors ~625 MB FP32)


def test_embedded_codec_is_deterministic_from_its_seed(codec_dir, tmp_path):
    from spark_quant.audio.codec import build_embedded_codec

    again = build_embedded_codec(tmp_path / "again", seed=0)
    want = json.loads((codec_dir.parent / "CODEC.json").read_text())["model_safetensors_sha256"]
    assert json.loads((again.parent / "CODEC.json").read_text())["model_safetensors_sha256"] == want
    assert build_embedded_codec(tmp_path / "again", seed=0) == again  # cached: not rebuilt


def test_decode_gives_320_samples_per_semantic_token_and_is_repeatable(codec):
    import numpy as np

    sem = [(11 * i) % 8192 for i in range(37)]
    a, b = codec.decode(GLOBALS, sem), codec.decode(GLOBALS, sem)
    assert a.dtype == np.float32 and a.shape == (37 * 320,)
    assert np.array_equal(a, b) and np.abs(a).max() <= 1.0 and a.std() > 0


def test_tokens_the_codec_cannot_decode_are_refused_with_the_reason(codec):
    from spark_quant.audio.codec import CodecInputError

    with pytest.raises(CodecInputError, match="no semantic tokens"):
        codec.decode(GLOBALS, [])
    with pytest.raises(CodecInputError, match="30 global tokens"):
        codec.decode(GLOBALS[:30], [1, 2, 3])
    with pytest.raises(CodecInputError, match="semantic token outside"):
        codec.decode(GLOBALS, [8192])


# --- bad BiCodec folders ------------------------------------------------------------------
def _folder_with(tmp_path: Path, codec_dir: Path, edit=None, weights=None) -> Path:
    import yaml

    d = tmp_path / "BiCodec"
    d.mkdir()
    cfg = yaml.safe_load((codec_dir / "config.yaml").read_text())
    if edit:
        edit(cfg["audio_tokenizer"])
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if weights is None:
        (d / "model.safetensors").symlink_to(codec_dir / "model.safetensors")
    elif weights != "absent":
        (d / "model.safetensors").write_bytes(weights)
    return d


def test_bicodec_folder_without_weights_is_one_line_error(tmp_path, codec_dir):
    from spark_quant.audio.codec import load_bicodec

    d = _folder_with(tmp_path, codec_dir, weights="absent")
    with pytest.raises(UserError, match=r"BiCodec/model.safetensors: missing") as e:
        load_bicodec(d)
    assert "\n" not in str(e.value)


def test_bicodec_weights_missing_tensors_for_the_config_are_refused(tmp_path, codec_dir):
    from spark_quant.audio.codec import load_bicodec

    d = _folder_with(tmp_path, codec_dir, edit=lambda c: c["postnet"].update(vocos_num_layers=7))
    with pytest.raises(UserError, match=r"model.safetensors: \d+ tensor\(s\) missing \(e.g. postnet.") as e:
        load_bicodec(d)
    assert "does not match" in str(e.value) and "\n" not in str(e.value)


def test_bicodec_weights_of_the_wrong_shape_are_refused(tmp_path, codec_dir):
    from spark_quant.audio.codec import load_bicodec

    d = _folder_with(tmp_path, codec_dir, edit=lambda c: c["quantizer"].update(codebook_size=4096))
    with pytest.raises(UserError, match=r"2 tensor\(s\) with the wrong shape \(e.g. quantizer.cluster_size: \[8192\], config.yaml gives \[4096\]\)"):
        load_bicodec(d)


def test_unreadable_weights_and_configs_are_one_line_errors(tmp_path, codec_dir):
    from spark_quant.audio.codec import load_bicodec

    d = _folder_with(tmp_path, codec_dir, weights=b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_bicodec(d)
    (d / "config.yaml").write_text("just: [a, list\n")
    with pytest.raises(UserError, match="config.yaml: not valid YAML"):
        load_bicodec(d)
    (d / "config.yaml").write_text("something_else: 1\n")
    with pytest.raises(UserError, match="no 'audio_tokenizer' section"):
        load_bicodec(d)


def test_the_models_own_bicodec_folder_wins_over_the_embedded_codec(tmp_path, codec_dir):
    from spark_quant.audio.codec import resolve_codec_dir

    model = tmp_path / "Spark-TTS-0.5B"
    (model / "BiCodec").mkdir(parents=True)
    assert resolve_codec_dir(model, tmp_path / "build") == (model / "BiCodec", False)
    assert not (tmp_path / "build").exists()


# --- WAV samples and the page ----------------------------------------------------------------
@pytest.fixture(scope="module")
def samples(codec, module_tmp_path):
    from spark_quant.audio.samples import write_audio_samples

    prompts, runs = prompts_and_runs()
    folder = module_tmp_path / "eval" / "audio"
    return folder, write_audio_samples(folder, prompts, runs, codec, per_mode=2)


def test_wav_files_are_16khz_mono_pcm_of_semantic_tokens_over_50_seconds(samples):
    folder, res = samples
    assert res["written"] == 7 and res["skipped"] == 1
    expected = {"00-controllable-baseline.wav": 60, "00-controllable-quantized.wav": 55,
                "01-controllable-baseline.wav": 25, "02-clone-baseline.wav": 40, "02-clone-quantized.wav": 40,
                "03-clone-baseline.wav": 51, "03-clone-quantized.wav": 48}
    assert sorted(p.name for p in folder.glob("*.wav")) == sorted(expected)
    for name, n_sem in expected.items():
        with wave.open(str(folder / name)) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
            assert w.getnframes() == n_sem * 320
            assert w.getnframes() / w.getframerate() == pytest.approx(n_sem / 50)
        assert (folder / name.replace(".wav", ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sample_without_semantic_tokens_is_skipped_with_its_reason(samples):
    _, res = samples
    row = next(s for s in res["samples"] if s["prompt"] == 1)
    assert row["quantized"]["skipped"] == "no semantic tokens (nothing to decode)"
    assert row["baseline"]["wav"] == "01-controllable-baseline.wav"
    assert [s["prompt"] for s in res["samples"]] == [0, 1, 2, 3]  # 2 per mode, prompt 4 not picked
    same = next(s for s in res["samples"] if s["prompt"] == 2)
    assert same["duration_ratio"] == 1.0 and same["log_spectral_distance_db"] == pytest.approx(0.0, abs=1e-6)


def test_page_and_report_section_link_every_file_and_say_the_weights_are_random(samples):
    from spark_quant.reporting.audio import render_samples as render_markdown

    folder, res = samples
    page = (folder / "index.html").read_text()
    assert page.count("<audio ") == 7 and page.count("<img ") == 7
    assert "random weights" in page and "skipped: no semantic tokens" in page
    md = "\n".join(render_markdown(res))
    assert "**The codec has random weights**" in md and "(audio/index.html)" in md
    assert "[1.20 s](audio/00-controllable-baseline.wav)" in md
    assert "A second \\| line." in md  # a | in the text does not break the table


def test_each_pair_gets_its_speaker_similarity_and_the_page_says_what_it_is_worth(samples):
    pytest.importorskip("resemblyzer", reason="pip install --no-deps resemblyzer==0.1.4 librosa webrtcvad-wheels")
    from spark_quant.audio.speaker import RANDOM_CODEC_NOTE

    folder, res = samples
    sims = {s["prompt"]: s.get("speaker_similarity") for s in res["samples"]}
    assert sims[2] == pytest.approx(1.0, abs=1e-6)  # the same 40 tokens from both models: the same WAV
    assert sims[1] is None and -1 <= sims[0] < 1 and -1 <= sims[3] < 1
    sp = res["speaker"]
    assert sp["pairs"] == sp["similarity"]["n"] == 3 and sp["files"] == 7 and sp["note"] == RANDOM_CODEC_NOTE
    assert sp["similarity"]["value"] == pytest.approx((sims[0] + sims[2] + sims[3]) / 3)
    page = (folder / "index.html").read_text()
    assert "n = 3 pairs" in page and RANDOM_CODEC_NOTE in page and "speaker similarity 1.000" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_renders_in_headless_chromium(samples, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    folder, _ = samples
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(common + ["--dump-dom", (folder / "index.html").as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<audio ") == 7 and "Audio samples: BF16 vs INT8" in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,1100", (folder / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_an_audio_folder_that_cannot_be_written_is_one_line_error(tmp_path, codec):
    from spark_quant.audio.samples import write_audio_samples

    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    prompts, runs = prompts_and_runs()
    with pytest.raises(UserError, match=r"results/audio: audio folder is not writable") as e:
        write_audio_samples(blocker / "audio", prompts, runs, codec)
    assert "\n" not in str(e.value) and blocker.read_text().startswith("a file")


def test_eval_audio_step_keeps_the_eval_when_the_codec_folder_is_bad(tmp_path):
    """A damaged BiCodec/ in the user's model: results get the one-line reason, nothing raises."""
    from spark_quant.audio.evalstep import audio_step
    from spark_quant.config import load_experiment

    model = tmp_path / "Spark-TTS-0.5B"
    (model / "BiCodec").mkdir(parents=True)
    (model / "BiCodec/config.yaml").write_text("audio_tokenizer: {}\n")
    exp = load_experiment(None, ["eval.audio_samples=1", "eval.audio_stream_concurrency=[1]"])
    prompts, runs = prompts_and_runs()
    specs = {"baseline": {"model": str(model), "device": "cpu"}}  # no engine may start: python is not runnable
    res = audio_step(exp, tmp_path / "out", prompts, runs, model, False, specs, tmp_path, python="/nonexistent/python")
    assert "lacks encoder" in res["audio"]["skipped_all"] and res["audio_stream"] == res["audio"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*-stream*"))


# --- streaming ----------------------------------------------------------------------------------
def test_chunk_plan_first_50_then_growing_to_the_cap():
    from itertools import islice

    from spark_quant.audio.stream import ChunkPlan

    assert list(islice(ChunkPlan().sizes(), 5)) == [50, 100, 200, 200, 200]
    assert list(islice(ChunkPlan(first_chunk=25, growth=1.5, max_chunk=60).sizes(), 4)) == [25, 38, 57, 60]


def test_playback_counts_stalls_when_a_chunk_is_late():
    from spark_quant.audio.stream import playback

    assert playback([0.5, 1.2, 3.0], [1.0, 2.0, 1.0]) == (0.0, 0)  # 2nd ready before 1.5, 3rd before 3.5
    stall, n = playback([0.5, 2.0, 3.0], [1.0, 0.5, 1.0])  # 2nd due at 1.5 (0.5 late), 3rd due at 2.5 (0.5 late)
    assert n == 2 and stall == pytest.approx(1.0)


def test_playback_margin_is_the_closest_call_and_negative_for_an_underrun():
    from spark_quant.audio.stream import playback, playback_margin, request_margin, request_underrun

    assert playback_margin([0.5, 1.2, 3.0], [1.0, 2.0, 1.0]) == pytest.approx(0.3)  # due 1.5 and 3.5: 0.3, 0.5 early
    assert playback_margin([0.5, 2.0, 3.0], [1.0, 0.5, 1.0]) == pytest.approx(-0.5)  # both 0.5 late
    assert playback_margin([0.5], [1.0]) is None  # one chunk cannot underrun
    # the sign agrees with playback's stall count on the same chunks
    for ready in ([0.0, 0.99, 1.5], [0.0, 1.01, 1.5], [0.0, 0.5, 2.2]):
        assert (playback_margin(ready, [1.0, 1.0, 1.0]) < 0) == (playback(ready, [1.0, 1.0, 1.0])[1] > 0)
    # a streamed request's record: chunk lengths in semantic tokens (50 per second of audio)
    req = {"chunks": [{"start": 0, "end": 50, "ready_s": 1.185}, {"start": 50, "end": 108, "ready_s": 2.197}]}
    assert request_margin(req) == pytest.approx(-0.012)
    assert request_margin({**req, "skipped": "no semantic tokens"}) is None
    # a client that waits 100 ms before it plays: the same chunks, no underrun, 88 ms to spare
    assert request_margin(req, 0.1) == pytest.approx(0.088) and request_underrun(req, 0.1) == (0.0, 0)
    assert request_underrun(req)[1] == 1 and request_underrun(req)[0] == pytest.approx(0.012)
    assert request_margin({**req, "prebuffer_s": 0.1}) == pytest.approx(0.088)  # the request's own prebuffer
    assert playback([0.5, 1.6], [1.0, 1.0], prebuffer=0.2) == (0.0, 0)
    assert playback_margin([0.5, 1.6], [1.0, 1.0], prebuffer=0.2) == pytest.approx(0.1)


def _replay(outputs: list[tuple[str, list[int]]], decode, plan, all_semantic=False, delta=7, header=0,
            max_batch=1):
    """Feed saved outputs into StreamingRequests `delta` tokens at a time, concurrently, one codec thread."""
    import time

    from spark_quant.audio.stream import CodecRunner, StreamingRequest

    async def one(mode, toks, runner):
        req = StreamingRequest(mode=mode, plan=plan, runner=runner, t0=time.perf_counter(),
                               prompt_globals=GLOBALS, count_all_as_semantic=all_semantic,
                               header_tokens=header)
        for i in range(0, len(toks), delta):
            req.feed(toks[i:i + delta])
            await asyncio.sleep(0)
        req.finish()
        return await req.done()

    async def main():
        runner = CodecRunner(decode, max_batch=max_batch)
        try:
            return await asyncio.gather(*(one(m, t, runner) for m, t in outputs))
        finally:
            runner.close()

    return asyncio.run(main())


def test_streamed_chunks_cover_every_semantic_token_once_with_context(codec):
    import numpy as np

    from spark_quant.audio.stream import ChunkPlan

    calls = []

    def decode(g, s):
        calls.append((tuple(g), len(s)))
        return codec.decode(g, s)

    recs = _replay([("controllable", controllable_output(180)), ("clone", clone_output(30)),
                    ("controllable", controllable_output(0))], decode, ChunkPlan(context=10))
    ctrl, clone, empty = recs
    assert [(c["start"], c["end"], c["context"]) for c in ctrl["chunks"]] == [(0, 50, 0), (50, 150, 10), (150, 180, 10)]
    assert [c["samples"] for c in ctrl["chunks"]] == [50 * 320, 100 * 320, 30 * 320]
    assert [(c["start"], c["end"]) for c in clone["chunks"]] == [(0, 30)]  # shorter than a chunk: flushed at EOS
    assert empty["skipped"] == "no semantic tokens" and not empty["chunks"]
    assert all(g == tuple(GLOBALS) for g, _ in calls)
    assert sorted(n for _, n in calls) == [30, 40, 50, 110]
    for r in (ctrl, clone):
        assert r["first_audio_s"] >= r["first_chunk_tokens_s"] and r["audio_s"] == r["semantic_tokens"] / 50
        assert r["rtf"] == pytest.approx(r["last_audio_s"] / r["audio_s"]) and r["underrun_s"] >= 0
        assert np.isfinite(r["codec_s"]) and r["codec_s"] > 0
    s = summarize(recs)
    assert s["requests"] == 3 and s["decoded"] == 2 and s["skipped"] == ["no semantic tokens"]
    assert s["all"]["first_audio_s"]["n"] == 2 and set(s) >= {"controllable", "clone"}
    lo, hi = s["all"]["rtf"]["ci95"]
    assert lo <= s["all"]["rtf"]["p50"] <= hi
    assert 0 < s["all"]["codec_share_of_first_audio"] <= 1


def test_batched_decode_equals_decoding_each_chunk_alone(codec):
    import numpy as np

    rng = __import__("random").Random(5)
    items = [([rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(n)])
             for n in (50, 60, 50, 8, 50)]  # three of one length share a batch; the order is kept
    batch = codec.decode_batch(items)
    assert [len(w) for w in batch] == [n * 320 for n in (50, 60, 50, 8, 50)]
    for (g, s), w in zip(items, batch):
        np.testing.assert_allclose(w, codec.decode(g, s), atol=1e-5)
    assert not np.allclose(batch[0], batch[2])  # different tokens, different audio: no row was mixed up
    from spark_quant.audio.codec import CodecInputError

    with pytest.raises(CodecInputError, match="no semantic tokens"):
        codec.decode_batch([items[0], (items[1][0], [])])


def test_codec_graphs_pad_to_a_bucket_capture_at_the_second_sight_and_decode_as_eager(codec, monkeypatch):
    """The graph cache's own logic on the CPU: a stand-in for CUDA capture whose replay reruns the forward pass
    on the static inputs, so padding, slicing, when a shape is captured and the eager fallback are tested here
    (the CUDA capture itself is torch's; audio.bench --graphs checks it on a GPU against eager)."""
    import numpy as np

    from spark_quant.audio import graphs as cm

    def cpu_record(self, forward, sem, glob):
        out = forward(sem, glob)
        return (lambda: out.copy_(forward(sem, glob))), out

    rng = random.Random(5)
    items = [([rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(12)]) for _ in range(6)]
    ref = [codec.decode(g, s) for g, s in items]  # eager, one by one
    with pytest.raises(ValueError, match="codec graphs need a CUDA device; this codec runs on cpu"):
        codec.use_graphs(True)
    graphs = cm.Graphs()
    monkeypatch.setattr(cm.Graphs, "record", cpu_record)
    monkeypatch.setattr(codec, "graphs", True)
    monkeypatch.setattr(codec, "_graphs", graphs)

    def close(got, want):
        return all(np.allclose(a, b, atol=1e-5) for a, b in zip(got, want, strict=True))

    assert close(codec.decode_batch(items[:3]), ref[:3])  # 3 chunks: bucket 4, first sight, eager
    assert graphs.info()["graphs"] == 0 and graphs.stats["eager_passes"] == 1
    assert close(codec.decode_batch(items[3:6]), ref[3:6])  # second sight: captured, replayed with a padding row
    assert close(codec.decode_batch(items[:3]), ref[:3])  # the same graph, new rows copied into its inputs
    assert (graphs.info()["graphs"], graphs.stats["replayed_passes"]) == (1, 2) and list(graphs.graphs) == [(4, 12)]

    def no_capture(self, forward, sem, glob):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(cm.Graphs, "record", no_capture)
    for _ in range(3):  # a shape whose capture fails decodes eagerly from then on, and is tried once
        assert close(codec.decode_batch(items[:1]), ref[:1])
    info = graphs.info()
    assert info["failed_shapes"] == 1 and info["first_failure"] == "operation not permitted when stream is capturing"
    assert graphs.stats["eager_passes"] == 4 and info["graphs"] == 1


def test_right_padding_to_a_shared_length_changes_the_chunk_tail_so_batches_group_by_length(codec):
    """Why ``decode_batch`` runs one pass per chunk length (gpu8: about 5 passes per full call on the H200)
    instead of padding the chunks to one length: BiCodec's receptive field reaches about 18 tokens, so tokens
    appended after a chunk change its last 0.35 s of audio far beyond rounding."""
    import numpy as np

    rng = __import__("random").Random(7)
    g, s = [rng.randrange(4096) for _ in range(32)], [rng.randrange(8192) for _ in range(44)]
    plain = codec.decode(g, s[:40])
    padded = codec.decode(g, s[:40] + [0] * 4)[: len(plain)]
    diff = np.abs(padded - plain)
    changed = np.nonzero(diff > 1e-3 * np.abs(plain).max())[0]
    assert changed.size and diff.max() > 0.1 * np.abs(plain).max(), diff.max()
    assert (len(plain) - changed[0]) / 320 > 8  # more than 8 tokens (160 ms) of the tail moved
    np.testing.assert_allclose(padded[: 20 * 320], plain[: 20 * 320], atol=1e-5)  # the start did not


def test_codec_thread_batches_the_chunks_that_queued_while_it_was_busy():
    import threading
    import time

    from spark_quant.audio.stream import CodecRunner

    busy = threading.Event()

    def decode_batch(items):
        busy.set()
        time.sleep(0.2)  # the codec is busy: the next chunks queue meanwhile
        return [f"wav{s[0]}" for _, s in items]

    async def main(max_batch):
        runner = CodecRunner(decode_batch=decode_batch, max_batch=max_batch)
        try:
            first = asyncio.ensure_future(runner.run([0], [0]))
            await asyncio.get_running_loop().run_in_executor(None, busy.wait)
            rest = [asyncio.ensure_future(runner.run([0], [k])) for k in range(1, 6)]
            return await asyncio.gather(first, *rest), runner.calls
        finally:
            runner.close()

    out, calls = asyncio.run(main(max_batch=4))
    assert calls == [1, 4, 1] and [o[0] for o in out] == [f"wav{k}" for k in range(6)]
    assert [o[3] for o in out] == [1, 4, 4, 4, 4, 1]
    assert all(o[1] >= 0 and o[2] >= 0.2 for o in out)  # queued time, the call's decode time
    busy.clear()
    _, calls = asyncio.run(main(max_batch=1))
    assert calls == [1] * 6


def test_a_failed_batched_decode_reaches_every_chunk_of_the_batch():
    from spark_quant.audio.codec import CodecInputError
    from spark_quant.audio.stream import CodecRunner

    def decode_batch(items):
        raise CodecInputError("global token outside 0..4095")

    async def main():
        runner = CodecRunner(decode_batch=decode_batch, max_batch=8)
        try:
            return await asyncio.gather(*(runner.run([0], [k]) for k in range(3)), return_exceptions=True)
        finally:
            runner.close()

    out = asyncio.run(main())
    assert len(out) == 3 and all(isinstance(e, CodecInputError) for e in out)
    with pytest.raises(ValueError, match="max_batch=0"):
        CodecRunner(decode_batch=decode_batch, max_batch=0)


def test_batched_streaming_cuts_the_same_chunks_as_one_by_one():
    import numpy as np

    from spark_quant.audio.stream import ChunkPlan

    outs = [("controllable", controllable_output(180)), ("clone", clone_output(120)), ("clone", clone_output(75))]
    one = _replay(outs, lambda g, s: np.zeros(len(s) * 320, np.float32), ChunkPlan())
    many = _replay(outs, lambda g, s: np.zeros(len(s) * 320, np.float32), ChunkPlan(), max_batch=8)

    def cuts(recs):
        return [[(c["start"], c["end"], c["samples"]) for c in r["chunks"]] for r in recs]

    assert cuts(one) == cuts(many)
    assert all(c["codec_batch"] == 1 for r in one for c in r["chunks"])


def test_fixed_length_mode_counts_every_token_as_semantic():
    import numpy as np

    from spark_quant.audio.stream import ChunkPlan

    toks = list(range(151000, 151120)) + [spark.EOS_ID]  # random-proxy text tokens, an EOS that is ignored
    (rec,) = _replay([("controllable", toks)], lambda g, s: np.zeros(len(s) * 320, np.float32), ChunkPlan(),
                     all_semantic=True)
    assert rec["semantic_tokens"] == 121 and [c["end"] for c in rec["chunks"]] == [50, 121]


def test_fixed_length_mode_leaves_the_header_tokens_out_of_the_audio():
    import numpy as np

    from spark_quant.audio.stream import ChunkPlan

    toks = list(range(151000, 151139))  # 39 header tokens (controllable: labels + 32 globals), then 100
    (rec,) = _replay([("controllable", toks)], lambda g, s: np.zeros(len(s) * 320, np.float32), ChunkPlan(),
                     all_semantic=True, delta=1, header=39)
    assert rec["semantic_tokens"] == 100 and rec["generated_tokens"] == 139
    assert [c["end"] for c in rec["chunks"]] == [50, 100]
    assert rec["audio_s"] == pytest.approx(2.0)


def test_stream_table_has_a_row_per_model_concurrency_and_mode():

    def req(mode, first, last, codec1):
        return {"mode": mode, "first_audio_s": first, "first_chunk_tokens_s": first - codec1,
                "first_chunk_codec_s": codec1, "last_audio_s": last, "audio_s": 2.0, "codec_s": 2 * codec1,
                "codec_wait_s": 0.0, "rtf": last / 2.0, "underrun_s": 0.0, "underruns": 0}

    rows = [{"concurrency": 1, "summary": summarize([req("clone", 0.3, 1.0, 0.1), req("controllable", 0.5, 1.5, 0.2)])}]
    res = {"token_source": "saved", "plan": {"first_chunk": 50}, "requests_at_c1": 2, "codec_batch": 16,
           "models": {"baseline": {"ok": True, "rows": rows, "codec": {"implementation": "x", "device": "cpu",
                                                                         "random_weights": True}},
                      "quantized": {"ok": False, "error": "vLLM worker failed: boom"}}}
    md = "\n".join(render_stream(res))
    assert "| BF16 | 1 | clone | 1 | 300 |" in md and "| BF16 | 1 | all | 2 | 400 [300, 500] |" in md
    assert "| INT8 | – | – | – | failed: vLLM worker failed: boom |" in md and "random weights" in md
    assert "one batched call (at most 16)" in md
    assert "batched call" not in "\n".join(render_stream({**res, "codec_batch": 1}))
    assert "prebuffer" not in md
    pre = "\n".join(render_stream({**res, "plan": {"first_chunk": 50, "prebuffer_s": 0.1}}))
    assert "playback starts 100 ms after the first chunk: the listener's prebuffer, not counted in first audio" in pre


# --- one engine: streamed TTS on the trained proxy ------------------------------------------------
@pytest.mark.e2e
def test_stream_session_on_the_trained_proxy_writes_first_audio_rtf_and_underrun(trained_proxy, codec_dir, tmp_path):
    """One real engine + codec session (audio.stream_session driven by audio.stream_pool): c=1 and c=2."""
    from conftest import TEST_KV_CACHE, serve_python

    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM")
    from spark_quant.audio.evalstep import stream_prompts
    from spark_quant.audio.stream_pool import stream_over_replicas
    from spark_quant.models.folder import load_tokenizer

    tok = load_tokenizer(trained_proxy / "LLM")
    g = GLOBALS
    prompts = [{"mode": "controllable", "ids": tok.encode(spark.controllable_prompt(
                "The weather is lovely today and we walk along the river.", "female", "moderate", "low"))},
               {"mode": "clone", "ids": tok.encode(spark.clone_prompt(
                "Please read this sentence slowly and clearly for me.", g))}]
    spec = {"model": str(trained_proxy / "LLM"), "dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 2,
            "gpu_memory_utilization": 0.1, "enforce_eager": True, "device": "cpu", "seed": 0,
            "engine_overrides": TEST_KV_CACHE,
            "stream": {"codec_dir": str(codec_dir), "prompts": stream_prompts(prompts, False), "concurrency": [1, 2],
                       "requests": 2, "max_tokens": 300, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
                       "codec_batch": 4}}
    res = stream_over_replicas(spec, 1, tmp_path, py, "m", 900)
    assert res["ok"], res.get("error")
    assert res["codec"]["random_weights"] and [r["concurrency"] for r in res["rows"]] == [1, 2]
    assert res["codec_batch"] == 4 and res["replicas"] == 1 and res["engine"]["kv_cache_tokens"] > 0
    for row in res["rows"]:
        calls = row["codec_calls"]  # every chunk of the level went through the codec thread, at most 4 a call
        assert calls["chunks"] == sum(len(r["chunks"]) for r in row["requests"]) and 1 <= calls["largest_batch"] <= 4
        assert calls["n"] <= calls["chunks"]
        s = row["summary"]
        assert s["decoded"] == len(row["requests"]) == 2, s["skipped"]
        for r in row["requests"]:
            assert r["semantic_tokens"] > 0 and r["chunks"][0]["start"] == 0
            assert r["chunks"][-1]["end"] == r["semantic_tokens"]
            assert r["first_audio_s"] > r["ttft_s"] > 0 and r["rtf"] > 0 and r["underruns"] >= 0
        assert s["all"]["first_audio_s"]["p50"] > 0



@pytest.mark.parametrize("order", ["fifo", "deadline"])
def test_codec_queue_takes_chunks_in_arrival_or_playback_deadline_order(order):
    import threading
    import time

    import numpy as np

    from spark_quant.audio.stream import CodecRunner

    gate, seen = threading.Event(), []

    def decode_batch(items):
        gate.wait(10)
        seen.append([s[0] for _, s in items])
        return [np.zeros(320 * len(s), np.float32) for _, s in items]

    async def main():
        runner = CodecRunner(decode_batch=decode_batch, max_batch=2, order=order)
        try:
            busy = asyncio.ensure_future(runner.run(GLOBALS, [0]))
            await asyncio.sleep(0.1)  # the thread has taken it and waits at the gate while the rest queue
            now = time.perf_counter()
            jobs = [asyncio.ensure_future(runner.run(GLOBALS, [k], d))
                    for k, d in ((1, now + 5), (2, now + 1), (3, now + 3), (4, None))]
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(busy, *jobs)
        finally:
            runner.close()

    asyncio.run(main())
    assert seen[0] == [0]
    # deadline order: a chunk without a deadline is due at submission (earliest here), then +1 s, +3 s, +5 s
    assert seen[1:] == ([[1, 2], [3, 4]] if order == "fifo" else [[4, 2], [3, 1]])
    with pytest.raises(ValueError, match="codec order 'lifo'"):
        CodecRunner(decode_batch=decode_batch, order="lifo")


@pytest.mark.parametrize("order", ["fifo", "deadline", "playing"])
def test_playing_order_puts_streams_already_playing_first_read_when_the_codec_picks(order):
    """``playing``: chunks of streams whose playback has started go first (earliest due first), the others after
    in arrival order; whether a stream plays is asked when the codec thread picks, so a chunk queued before its
    stream's first chunk was decoded moves up once it is."""
    import threading
    import time

    import numpy as np

    from spark_quant.audio.stream import CodecRunner

    gate, seen, started = threading.Event(), [], {"d": False}

    def decode_batch(items):
        gate.wait(10)
        seen.append(items[0][1][0])
        return [np.zeros(320 * len(s), np.float32) for _, s in items]

    async def main():
        runner = CodecRunner(decode_batch=decode_batch, max_batch=1, order=order)
        try:
            busy = asyncio.ensure_future(runner.run(GLOBALS, [0]))
            await asyncio.sleep(0.1)
            now = time.perf_counter()
            dues = {1: lambda: (False, now + 0.25),  # new streams' first chunks
                    2: lambda: (False, now + 0.30),
                    3: lambda: (True, now + 5),  # a stream playing, due in 5 s
                    4: lambda: (started["d"], now + 1 if started["d"] else now + 9)}  # starts playing meanwhile
            jobs = [asyncio.ensure_future(runner.run(GLOBALS, [k], None, dues[k])) for k in (1, 2, 3, 4)]
            await asyncio.sleep(0.05)
            started["d"] = True
            gate.set()
            await asyncio.gather(busy, *jobs)
        finally:
            runner.close()

    asyncio.run(main())
    assert seen == {"fifo": [0, 1, 2, 3, 4], "deadline": [0, 1, 2, 4, 3], "playing": [0, 4, 3, 1, 2]}[order]


def test_codec_runner_configure_changes_order_and_batch_and_refuses_bad_values():
    import numpy as np

    from spark_quant.audio.stream import CodecRunner

    runner = CodecRunner(lambda g, s: np.zeros(320 * len(s), np.float32))
    try:
        assert (runner.order, runner.max_batch) == ("fifo", 1)
        runner.configure("playing", 64)
        assert (runner.order, runner.max_batch) == ("playing", 64)
        runner.configure(max_batch=16)
        assert (runner.order, runner.max_batch) == ("playing", 16)
        with pytest.raises(ValueError, match="max_batch=0"):
            runner.configure(max_batch=0)
        with pytest.raises(ValueError, match="codec order 'lifo'"):
            runner.configure("lifo")
        assert (runner.order, runner.max_batch) == ("playing", 16)
    finally:
        runner.close()


@pytest.mark.parametrize("prebuffer", [0.0, 0.1])
def test_a_playing_streams_chunks_are_due_when_playback_reaches_them(prebuffer):
    import time

    import numpy as np

    from spark_quant.audio.stream import ChunkPlan, CodecRunner, StreamingRequest

    asked = []

    class Recording(CodecRunner):
        async def run(self, glob, sem, deadline=None, due=None):
            asked.append(deadline)
            return await super().run(glob, sem, deadline, due)

    async def main():
        runner = Recording(lambda g, s: np.zeros(320 * len(s), np.float32), order="deadline", first_slack_s=0.25)
        t0 = time.perf_counter()
        req = StreamingRequest(mode="clone", plan=ChunkPlan(prebuffer_s=prebuffer), runner=runner, t0=t0,
                               prompt_globals=GLOBALS)
        toks = clone_output(180)
        try:
            before = time.perf_counter()
            req.feed(toks[:51])  # <|start_semantic_token|> + 50 codes: the first chunk
            after = time.perf_counter()
            await asyncio.sleep(0)
            await req.tasks[0]
            req.feed(toks[51:-1])  # 130 more: the second chunk (100 codes) now, the last 30 at the end
            req.finish()
            return await req.done(), t0, before, after
        finally:
            runner.close()

    rec, t0, before, after = asyncio.run(main())
    assert [c["end"] for c in rec["chunks"]] == [50, 150, 180] and len(asked) == 3
    assert before + 0.25 <= asked[0] <= after + 0.25  # a first chunk: due its slack after submission
    # later chunks: due when playback, started at the first chunk's ready time (+ the prebuffer), reaches their
    # first code; first audio is the first chunk's arrival, without the prebuffer
    play = t0 + rec["chunks"][0]["ready_s"] + prebuffer
    assert asked[1] == pytest.approx(play + 50 / spark.SEMANTIC_PER_SECOND, abs=1e-9)
    assert asked[2] == pytest.approx(play + 150 / spark.SEMANTIC_PER_SECOND, abs=1e-9)
    assert rec["first_audio_s"] == rec["chunks"][0]["ready_s"] and rec.get("prebuffer_s", 0.0) == prebuffer


def test_gpu_audio_reprints_a_saved_runs_tail_table_with_its_playback_margins():
    """eval/gpu_audio.py --from: the H100 run gpu10's one underrun (playing-16, round 4, 12 ms) is its round's
    negative margin; nothing is run or written."""
    import subprocess
    import sys

    from conftest import ROOT

    saved = ROOT / "docs/results/h100-gpu10/audio-cb-arms/audio.json.gz"
    out = subprocess.run([sys.executable, "eval/gpu_audio.py", "--from", str(saved)], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    row = next(x for x in out.splitlines() if "(playing-16, round 4)" in x)
    assert "| 1/1024 | 12 | 320 | -12 / 144 |" in row
    fifo = next(x for x in out.splitlines() if "(fifo-16, round 1)" in x)
    assert "| 173/1024 |" in fifo and "| -1482 / -1254 |" in fifo
    # the same chunks played by a client with a 100 ms prebuffer: that round's one underrun is gone
    out = subprocess.run([sys.executable, "eval/gpu_audio.py", "--from", str(saved), "--prebuffer-ms", "100"], cwd=ROOT,
                         text=True, capture_output=True, check=True).stdout
    assert "100 ms prebuffer" in out
    assert "| 0/1024 | 0 | 320 | 88 / 244 |" in next(x for x in out.splitlines() if "(playing-16, round 4)" in x)
