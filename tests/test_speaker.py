"""Speaker similarity (spark_quant/audio/speaker.py): Resemblyzer's real pretrained encoder on real WAV files.

The "speech-like" audio is a source-filter vowel synthesizer (a glottal pulse train with intonation and
jitter through three formant resonators, one vowel per 0.2 s syllable): one voice is an F0 and a set of
formants, an utterance is a seed. Rendering tests take results dicts and need no encoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from spark_quant.audio.speaker import NO_REFERENCE, RANDOM_CODEC_NOTE, html_summary, score_pairs
from spark_quant.reporting.audio import render_samples

SR = 16000
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (640, 1190, 2390)]


def speech_like(seconds: float, f0: float, seed: int, formant_scale: float = 1.0) -> np.ndarray:
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t) + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n))
    pulses = (np.diff(np.floor(np.cumsum(f / SR)), prepend=0) > 0).astype(float) + 0.02 * rng.standard_normal(n)
    out, seg = np.zeros(n), int(0.2 * SR)
    for s in range(0, n, seg):
        x = pulses[s:s + seg]
        for fc, bw in zip(VOWELS[rng.integers(len(VOWELS))], (80, 100, 120)):
            r, th = np.exp(-np.pi * bw / SR), 2 * np.pi * fc * formant_scale / SR
            x = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], x)
        out[s:s + seg] = x * np.sin(np.linspace(0, np.pi, len(x))) ** 0.5
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def white_noise(seconds: float) -> np.ndarray:
    return (0.3 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("resemblyzer", reason="pip install --no-deps resemblyzer==0.1.4 librosa webrtcvad-wheels")
    from spark_quant.audio.speaker import SpeakerEncoder

    return SpeakerEncoder()


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> dict[str, Path]:
    from spark_quant.audio.samples import write_wav

    d = tmp_path_factory.mktemp("speaker")
    audio = {"voice_a1": speech_like(3, 110, 1), "voice_a2": speech_like(3, 110, 2),
             "voice_b": speech_like(3, 220, 3, formant_scale=1.2), "noise": white_noise(3), "tone": tone(3)}
    for name, wav in audio.items():
        write_wav(d / f"{name}.wav", wav)
    return {name: d / f"{name}.wav" for name in audio}


@pytest.fixture(scope="module")
def embeds(encoder, wavs):
    return {name: encoder.embed_file(p) for name, p in wavs.items()}


def test_the_same_wav_twice_has_similarity_one(encoder, wavs, embeds):
    from spark_quant.audio.speaker import cosine

    again = encoder.embed_file(wavs["voice_a1"])
    assert cosine(embeds["voice_a1"].vector, again.vector) == pytest.approx(1.0, abs=1e-6)
    assert embeds["voice_a1"].vector.shape == (256,)
    assert np.linalg.norm(embeds["voice_a1"].vector) == pytest.approx(1.0, abs=1e-5)


def test_one_voice_is_closer_to_itself_than_to_another_voice_noise_or_a_tone(embeds):
    from spark_quant.audio.speaker import cosine

    def sim(a, b):
        return cosine(embeds[a].vector, embeds[b].vector)

    same_voice = sim("voice_a1", "voice_a2")  # same F0 and formants, other syllables
    assert same_voice > 0.7
    assert sim("voice_a1", "voice_b") < same_voice - 0.1
    assert sim("voice_a1", "noise") < same_voice - 0.2
    assert sim("voice_a1", "tone") < same_voice - 0.2


def test_the_voice_detector_keeps_speech_like_audio_and_finds_no_voice_in_a_tone(embeds):
    assert embeds["voice_a1"].voiced_s > 2.5 and embeds["voice_a1"].audio_s == pytest.approx(3.0)
    assert embeds["tone"].voiced_s == 0.0  # embedded untrimmed, counted as no_voice


def test_silent_audio_is_refused(encoder):
    with pytest.raises(ValueError, match="silent audio"):
        encoder.embed(np.zeros(SR, np.float32))


def _rows() -> list[dict]:
    return [{"prompt": 0, "mode": "controllable", "text": "same file", "baseline": {"wav": "voice_a1.wav"},
             "quantized": {"wav": "voice_a1.wav"}},
            {"prompt": 1, "mode": "controllable", "text": "voice vs noise", "baseline": {"wav": "voice_a1.wav"},
             "quantized": {"wav": "noise.wav"}},
            {"prompt": 2, "mode": "clone", "text": "one side skipped", "baseline": {"wav": "voice_a2.wav"},
             "quantized": {"skipped": "no semantic tokens (nothing to decode)"}}]


def test_score_pairs_sets_each_pairs_similarity_and_the_mean_with_its_interval(encoder, wavs, embeds):
    from spark_quant.audio.speaker import cosine

    rows = _rows()
    res = score_pairs(wavs["noise"].parent, rows, random_weights=True, encoder=encoder)
    assert rows[0]["speaker_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["speaker_similarity"] == pytest.approx(cosine(embeds["voice_a1"].vector, embeds["noise"].vector),
                                                          abs=1e-6)
    assert "speaker_similarity" not in rows[2]
    s = res["similarity"]
    assert res["pairs"] == s["n"] == 2 and res["files"] == 5 and res["no_voice_files"] == 0 and not res["errors"]
    assert s["value"] == pytest.approx((rows[0]["speaker_similarity"] + rows[1]["speaker_similarity"]) / 2)
    assert s["low"] <= s["value"] <= s["high"] and s["method"] == "bootstrap"
    assert res["note"] == RANDOM_CODEC_NOTE and res["reference"] == NO_REFERENCE
    assert res["embed_s_per_audio_s"] > 0 and res["audio_s"] == pytest.approx(5 * 3.0)


def test_without_resemblyzer_one_line_says_so_and_no_row_changes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "resemblyzer", None)  # import resemblyzer -> ImportError
    rows = _rows()
    res = score_pairs(tmp_path, rows, random_weights=False)
    assert res["skipped"].startswith("resemblyzer is not installed") and "pip install" in res["skipped"]
    assert "\n" not in res["skipped"] and "note" not in res
    assert not any("speaker_similarity" in r for r in rows)
    md = "\n".join(render_samples(_audio_result(res, _rendered_rows())))
    assert "Speaker similarity: not measured (resemblyzer is not installed" in md
    assert "not measured: resemblyzer is not installed" in html_summary(res)


# --- rendering from a results dict (no encoder) -------------------------------------------------
def _audio_result(speaker: dict | None, rows: list[dict]) -> dict:
    res = {"random_weights": True, "folder": "audio", "page": "audio/index.html", "written": 5, "skipped": 1,
           "per_mode": 2, "samples": rows,
           "codec": {"implementation": "spark-tts-lib 0.2.1 modules (BiCodec)", "device": "cpu", "folder": "x"}}
    return res | ({"speaker": speaker} if speaker is not None else {})


SPEAKER = {"random_weights": True, "note": RANDOM_CODEC_NOTE, "reference": NO_REFERENCE,
           "model": "Resemblyzer 0.1.4 VoiceEncoder (GE2E, pretrained.pt from the wheel)",
           "metric": "cosine of the two utterance embeddings (BF16 vs INT8)",
           "similarity": {"value": 0.9123, "low": 0.85, "high": 0.95, "n": 3, "method": "bootstrap"},
           "pairs": 3, "files": 6, "no_voice_files": 1, "errors": []}


def _rendered_rows() -> list[dict]:
    rows = _rows()
    rows[0] |= {"speaker_similarity": 1.0, "duration_ratio": 1.0, "log_spectral_distance_db": 0.0}
    rows[1] |= {"speaker_similarity": 0.4567, "duration_ratio": 1.0, "log_spectral_distance_db": 9.0}
    for r in rows:
        for name in ("baseline", "quantized"):
            if "wav" in r[name]:
                r[name] |= {"png": r[name]["wav"].replace(".wav", ".png"), "seconds": 3.0, "semantic_tokens": 150,
                            "finished": True}
    return rows


def test_report_section_gives_the_mean_interval_n_and_says_the_codec_is_random():
    md = "\n".join(render_samples(_audio_result(SPEAKER, _rendered_rows())))
    assert "mean 0.912 [0.850, 0.950] (95% bootstrap), n = 3 pairs" in md
    assert "n = 3 pairs. **Codec with random weights: similarity of noise-like audio, not a quality measure.**" in md
    assert "the voice detector found no voice in 1 of 6 files" in md
    assert "No similarity to the clone reference" in md
    assert "| log-spectral distance (dB) | speaker similarity |" in md
    assert "| 1.00 | 0.0 | 1.000 |" in md and "| 1.00 | 9.0 | 0.457 |" in md
    assert md.splitlines()[-1].endswith("| – | – | – |")  # the row with one side skipped


def test_report_without_random_weights_has_no_warning_and_older_results_render():
    real = SPEAKER | {"random_weights": False, "similarity": {"value": 0.97, "low": None, "high": None, "n": 1}}
    real.pop("note")
    md = "\n".join(render_samples(_audio_result(real, _rendered_rows()) | {"random_weights": False}))
    assert "mean 0.970 (no interval: n < 2), n = 1 pairs" in md and "random weights" not in md
    old = "\n".join(render_samples(_audio_result(None, _rendered_rows())))  # results.json from before this measurement
    assert "Speaker similarity" not in old and "| speaker similarity |" in old


def test_html_page_shows_the_summary_and_each_pairs_similarity():
    pytest.importorskip("torch")
    from spark_quant.audio.samples import render_html

    page = render_html(_audio_result(SPEAKER, _rendered_rows()))
    assert '<p class="warn">Speaker similarity BF16 vs INT8' in page
    assert "mean 0.912 [0.850, 0.950] (95% bootstrap), n = 3 pairs." in page and RANDOM_CODEC_NOTE in page
    assert page.count("speaker similarity 1.000") == 1 and page.count("speaker similarity 0.457") == 1


# --- the command line: rescoring a finished eval -------------------------------------------------
def test_cli_rescores_a_results_folder_without_changing_it(encoder, wavs, tmp_path, capsys):
    import json
    import shutil

    from spark_quant.audio.speaker import main

    (tmp_path / "audio").mkdir()
    for p in wavs.values():
        shutil.copy(p, tmp_path / "audio" / p.name)
    results = {"audio": {"folder": "audio", "random_weights": False, "samples": _rows()}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path), "--out", str(tmp_path / "speaker.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pairs"] == 2 and "note" not in out
    assert json.loads((tmp_path / "speaker.json").read_text())["rows"][0]["speaker_similarity"] == \
        pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_cli_on_a_folder_without_audio_samples_is_one_line_error(tmp_path):
    import json

    from spark_quant.audio.speaker import main
    from spark_quant.errors import UserError

    (tmp_path / "results.json").write_text(json.dumps({"fidelity": {}}))
    with pytest.raises(UserError, match=r"results.json: no audio samples to score \(KeyError") as e:
        main([str(tmp_path)])
    assert "\n" not in str(e.value) and "eval.audio_samples" in str(e.value)
