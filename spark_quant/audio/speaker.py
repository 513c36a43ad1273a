"""Speaker similarity of the BF16 / INT8 WAV pairs, with Resemblyzer's pretrained voice encoder.

Resemblyzer (PyPI ``resemblyzer==0.1.4``, Apache-2.0) ships its GE2E speaker encoder's weights inside the
wheel (``resemblyzer/pretrained.pt``, 17 MB), so nothing is downloaded at run time. Its utterance
embedding is a 256-d unit vector; the similarity of two files is the cosine of their embeddings (1 = the
same voice as far as the encoder can tell). Before embedding, each file gets Resemblyzer's own
preprocessing: volume normalized to -30 dBFS, long silences cut with WebRTC's voice-activity detector.
Audio the detector finds no voice in at all (a pure tone, silence-like output) is embedded untrimmed and
counted under ``no_voice_files``.

``score_pairs`` is what ``samples.write_audio_samples`` calls: it embeds the WAV files it wrote, adds
``speaker_similarity`` to every row that has both files, and returns the summary that goes into
``results.json`` under ``audio.speaker`` (mean over pairs with n and a 95% bootstrap interval,
``reporting.stats.mean_ci``). Without Resemblyzer it returns one line saying so and the audio step goes on.

Similarity to the clone prompt's reference voice is not computed: the eval's clone prompts carry only the
reference's 32 global tokens (``spark.clone_prompt(text, globals)``), no reference audio and no reference
semantic tokens, so there is no reference utterance to embed.
"""

from __future__ import annotations

import html
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from spark_quant.reporting.stats import mean_ci

PACKAGE = "resemblyzer"
INSTALL = "pip install --no-deps resemblyzer==0.1.4 librosa webrtcvad-wheels (make envs does)"
RANDOM_CODEC_NOTE = "codec with random weights: similarity of noise-like audio, not a quality measure"
NO_REFERENCE = ("no similarity to the clone reference: the clone prompts carry only its 32 global tokens, "
                "no reference audio")


class SpeakerEncoderUnavailable(RuntimeError):
    """Resemblyzer (or what it imports) is not installed; the message is one line saying what to install."""


@dataclass
class Embedding:
    vector: Any  # numpy float32 (256,), unit norm
    audio_s: float
    voiced_s: float  # what the voice-activity detector kept
    embed_s: float


class SpeakerEncoder:
    """Resemblyzer's ``VoiceEncoder`` on the CPU with its preprocessing; ``embed`` takes 16 kHz float audio."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            with warnings.catch_warnings():  # resemblyzer imports scipy.ndimage.morphology (deprecated)
                warnings.simplefilter("ignore", DeprecationWarning)
                from resemblyzer import VoiceEncoder, normalize_volume, preprocess_wav
                from resemblyzer.hparams import audio_norm_target_dBFS, sampling_rate
        except ImportError as e:
            raise SpeakerEncoderUnavailable(f"{PACKAGE} is not installed ({e}); {INSTALL}") from None
        self.sample_rate = sampling_rate
        self._preprocess = preprocess_wav
        self._untrimmed = lambda wav: normalize_volume(wav, audio_norm_target_dBFS, increase_only=True)
        t0 = time.perf_counter()
        self.net = VoiceEncoder(device, verbose=False)
        self.version = metadata.version(PACKAGE)
        self.name = f"Resemblyzer {self.version} VoiceEncoder (GE2E, pretrained.pt from the wheel)"
        self._warm_up()  # librosa's numba kernels load (or compile) on the first call: keep that out of embed_s
        self.load_s = time.perf_counter() - t0

    def _warm_up(self) -> None:
        import numpy as np

        self.embed(np.random.default_rng(0).uniform(-0.3, 0.3, self.sample_rate * 2).astype(np.float32))

    def embed(self, wav) -> Embedding:
        import numpy as np
        import torch

        wav = np.asarray(wav, dtype=np.float32)
        if not len(wav) or not np.any(wav):
            raise ValueError("silent audio (all zeros): no voice to embed")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = self._preprocess(wav)
        use = kept if len(kept) else self._untrimmed(wav)
        # one thread: the 3-layer LSTM runs 160 small sequential steps per partial; with two threads on a
        # busy 2-core machine OpenMP's synchronisation made it 150x slower (11.4 s against 0.07 s)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            vec = self.net.embed_utterance(np.asarray(use, dtype=np.float32))
        finally:
            torch.set_num_threads(threads)
        return Embedding(vector=vec, audio_s=len(wav) / self.sample_rate, voiced_s=len(kept) / self.sample_rate,
                         embed_s=time.perf_counter() - t0)

    def embed_file(self, path: Path) -> Embedding:
        import numpy as np
        from scipy.io import wavfile

        rate, pcm = wavfile.read(str(path))
        if rate != self.sample_rate or pcm.ndim != 1:
            raise ValueError(f"{path.name}: {rate} Hz, {pcm.ndim} channel(s); the encoder takes 16 kHz mono")
        wav = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        return self.embed(wav)


def cosine(a, b) -> float:
    """Cosine similarity of two embeddings (scipy's cosine distance, subtracted from 1)."""
    from scipy.spatial.distance import cosine as cosine_distance

    return float(1.0 - cosine_distance(a, b))


def score_pairs(folder: Path, samples: list[dict[str, Any]], random_weights: bool,
                encoder: SpeakerEncoder | None = None) -> dict[str, Any]:
    """Embed each row's ``baseline`` / ``quantized`` WAV under ``folder``; set ``row["speaker_similarity"]``
    where both exist; return the summary (or ``{"skipped": reason}``). Rows are changed in place."""
    base = {"random_weights": random_weights, "reference": NO_REFERENCE}
    if random_weights:
        base["note"] = RANDOM_CODEC_NOTE
    try:
        encoder = encoder or SpeakerEncoder()
    except SpeakerEncoderUnavailable as e:
        return base | {"skipped": str(e)}
    embeds: list[Embedding] = []
    sims, errors = [], []
    for row in samples:
        pair = {}
        for name in ("baseline", "quantized"):
            wav = row.get(name, {}).get("wav")
            if wav is None:
                continue
            try:
                pair[name] = encoder.embed_file(Path(folder) / wav)
            except (ValueError, RuntimeError, OSError) as e:  # silent audio, an unreadable file: that one only
                errors.append(f"{wav}: {e}")
        embeds += pair.values()
        if len(pair) == 2:
            row["speaker_similarity"] = cosine(pair["baseline"].vector, pair["quantized"].vector)
            sims.append(row["speaker_similarity"])
    audio_s = sum(e.audio_s for e in embeds)
    embed_s = sum(e.embed_s for e in embeds)
    return base | {
        "model": encoder.name, "load_s": encoder.load_s, "metric": "cosine of the two utterance embeddings (BF16 vs INT8)",
        "similarity": mean_ci(sims), "pairs": len(sims), "files": len(embeds),
        "no_voice_files": sum(1 for e in embeds if e.voiced_s == 0), "errors": errors,
        "audio_s": audio_s, "embed_s": embed_s, "embed_s_per_audio_s": embed_s / audio_s if audio_s else None,
    }


def html_summary(speaker: dict[str, Any] | None) -> str:
    """The page's paragraph on speaker similarity (empty for results written before it existed)."""
    if not speaker:
        return ""
    if "skipped" in speaker:
        return f'<p class="meta">Speaker similarity not measured: {html.escape(speaker["skipped"])}</p>'
    s = speaker["similarity"]
    value = "–" if s["value"] is None else f'{s["value"]:.3f}'
    ci = "" if s["low"] is None else f' [{s["low"]:.3f}, {s["high"]:.3f}]'
    warn = f' <b>Note: {html.escape(RANDOM_CODEC_NOTE)}.</b>' if speaker["random_weights"] else ""
    cls = ' class="warn"' if speaker["random_weights"] else ""
    return (f'<p{cls}>Speaker similarity BF16 vs INT8: mean {value}{ci} (95% bootstrap), n = {s["n"]} pairs.{warn} '
            f'Cosine of the two files\' embeddings by {html.escape(speaker["model"])}.</p>')


def bench(lengths: list[float], n: int) -> dict[str, Any]:
    """Embedding time by audio length (white noise, which the voice detector keeps whole), lengths interleaved,
    after the encoder's warm-up; median and its 95% bootstrap interval."""
    import statistics

    import numpy as np

    from spark_quant.reporting.stats import bootstrap_ci

    enc = SpeakerEncoder()
    rng = np.random.default_rng(0)
    wavs = {s: (0.3 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in lengths}
    times: dict[float, list[float]] = {s: [] for s in lengths}
    for _ in range(n):
        for s in lengths:
            times[s].append(enc.embed(wavs[s]).embed_s)
    print(f"{enc.name}, load + warm-up {enc.load_s:.2f} s\n| audio s | n | embed ms p50 [95% CI] | s per audio s |"
          "\n|---|---|---|---|")
    rows = []
    for s in lengths:
        p50, (lo, hi) = statistics.median(times[s]), bootstrap_ci(times[s])
        print(f"| {s:g} | {n} | {p50 * 1000:.0f} [{lo * 1000:.0f}, {hi * 1000:.0f}] | {p50 / s:.3f} |")
        rows.append({"audio_s": s, "n": n, "p50_s": p50, "ci95_s": [lo, hi], "raw_s": times[s]})
    return {"model": enc.name, "load_s": enc.load_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Score the WAV pairs of a finished eval again: ``python -m spark_quant.audio.speaker RESULTS_DIR``;
    time the encoder: ``python -m spark_quant.audio.speaker --bench``."""
    import argparse
    import json

    from spark_quant.errors import UserError
    from spark_quant.outputs import check_result_file, write_result_file

    ap = argparse.ArgumentParser(description="speaker similarity of an eval's BF16 / INT8 WAV pairs")
    ap.add_argument("results", type=Path, nargs="?", help="an eval results folder (results.json with audio)")
    ap.add_argument("--out", type=Path, help="write the rows and the summary here as JSON")
    ap.add_argument("--bench", type=float, nargs="*", metavar="SECONDS", help="time the encoder (default 1 4 10)")
    ap.add_argument("--n", type=int, default=8, help="--bench: repetitions per length")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier result of this tool at --out")
    args = ap.parse_args(argv)
    if args.out:
        check_result_file(args.out, "audio.speaker", args.overwrite)
    if args.bench is not None:
        res = bench(args.bench or [1.0, 4.0, 10.0], args.n)
        if args.out:
            write_result_file(args.out, res, "audio.speaker", args.overwrite)
        print(json.dumps({"load_s": res["load_s"], "p50_ms": {r["audio_s"]: round(r["p50_s"] * 1000, 1)
                                                              for r in res["rows"]}}))
        return 0
    if args.results is None:
        ap.error("give an eval results folder, or --bench")
    path = args.results / "results.json"
    try:
        audio = json.loads(path.read_text())["audio"]
        rows, folder, random_weights = audio["samples"], args.results / audio["folder"], audio["random_weights"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: no audio samples to score ({type(e).__name__}: {e}); run the eval with "
                        f"eval.audio_samples > 0") from None
    res = score_pairs(folder, rows, random_weights)
    print("| # | mode | speaker similarity |\n|---|---|---|")
    for r in rows:
        sim = r.get("speaker_similarity")
        print(f"| {r['prompt']} | {r['mode']} | {'–' if sim is None else f'{sim:.4f}'} |")
    if args.out:
        write_result_file(args.out, {"rows": rows, "speaker": res}, "audio.speaker", args.overwrite)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    from spark_quant.errors import run_main

    run_main(main)
