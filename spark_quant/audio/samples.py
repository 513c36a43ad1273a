"""BF16 vs INT8 audio side by side: WAV files, spectrogram PNGs and a static HTML page.

``write_audio_samples`` is the one entry point the eval stage calls, with the held-out prompts
and the worker results it already has (each model's greedy outputs, so the two models answer
the same prompt deterministically). For the first ``per_mode`` prompts of each mode it decodes
both models' outputs with BiCodec and writes, under ``folder`` (``eval/results/<exp>/audio/``):

- ``NN-<mode>-<model>.wav``: 16-bit PCM, 16 kHz, mono, ``semantic tokens / 50`` seconds;
- ``NN-<mode>-<model>.png``: its spectrogram (matplotlib);
- ``index.html``: audio players and spectrograms, BF16 and INT8 side by side.

Each pair also gets its speaker similarity (``speaker.score_pairs``: Resemblyzer's voice encoder, when installed).

A sample BiCodec cannot decode (no semantic tokens, not 32 global tokens) is skipped and its
reason recorded; the others are still written. It returns the dict that goes into
``results.json`` under ``audio``; ``reporting.audio.render_samples`` turns it into report.md's section.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from spark_quant import spark
from spark_quant.audio.codec import HOP, SAMPLE_RATE, Codec, CodecInputError, codec_info
from spark_quant.audio.speaker import html_summary, score_pairs
from spark_quant.errors import UserError

MODELS = (("baseline", "BF16"), ("quantized", "INT8"))


def prompt_globals(prompt_ids: list[int]) -> list[int]:
    """The 32 global tokens a voice-clone prompt carries (codebook indices)."""
    g0 = spark.RANGE_START["bicodec_global"]
    return [t - g0 for t in prompt_ids if spark.is_global_id(t)]


def tokens_to_decode(prompt: dict[str, Any], tokens: list[int]) -> tuple[list[int], list[int], bool]:
    """(global, semantic, finished) of one generation: globals from the output in controllable mode,
    from the prompt in clone mode (the model does not repeat them)."""
    out = spark.parse_ids(tokens, prompt["mode"])
    glob = out.global_tokens if prompt["mode"] == "controllable" else prompt_globals(prompt["ids"])
    return glob, out.semantic_tokens, out.finished


def check_folder_writable(folder: Path) -> None:
    """Create ``folder`` or fail with one line naming it (nothing else is touched)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{folder}: audio folder is not writable ({type(e).__name__}: {e.strerror or e}); "
                        f"give a writable eval output folder")


def write_wav(path: Path, wav) -> None:
    """16-bit PCM mono WAV at 16 kHz (scipy.io.wavfile)."""
    import numpy as np
    from scipy.io import wavfile

    pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    wavfile.write(str(path), SAMPLE_RATE, pcm)


def write_spectrogram(path: Path, wav, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.0, 2.2), dpi=100)
    ax.specgram(np.asarray(wav, dtype=np.float64) + 1e-9, NFFT=512, Fs=SAMPLE_RATE, noverlap=384, cmap="magma")
    ax.set_xlabel("s")
    ax.set_ylabel("Hz")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_spectral_distance_db(a, b) -> float | None:
    """Mean absolute difference of two waveforms' log-magnitude STFTs (dB) over their common length."""
    import numpy as np
    from scipy.signal import stft

    n = min(len(a), len(b))
    if n < 512:
        return None
    _, _, sa = stft(a[:n], fs=SAMPLE_RATE, nperseg=512, noverlap=384)
    _, _, sb = stft(b[:n], fs=SAMPLE_RATE, nperseg=512, noverlap=384)
    la, lb = 20 * np.log10(np.abs(sa) + 1e-5), 20 * np.log10(np.abs(sb) + 1e-5)
    return float(np.mean(np.abs(la - lb)))


def pick_prompts(prompts: list[dict[str, Any]], per_mode: int) -> list[int]:
    """Indices of the first ``per_mode`` prompts of each mode, in prompt order."""
    seen: dict[str, int] = {}
    out = []
    for i, p in enumerate(prompts):
        if seen.get(p["mode"], 0) < per_mode:
            seen[p["mode"]] = seen.get(p["mode"], 0) + 1
            out.append(i)
    return out


def write_audio_samples(folder: Path, prompts: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
                        codec: Codec, per_mode: int = 2, task: str = "greedy") -> dict[str, Any]:
    """Decode each model's ``task`` outputs for ``per_mode`` prompts per mode; write WAVs, PNGs, index.html."""
    folder = Path(folder)
    check_folder_writable(folder)
    outputs = {}
    for name, _ in MODELS:
        rs = runs.get(name) or []
        if rs and rs[0].get("ok") and task in rs[0].get("tasks", {}):
            outputs[name] = rs[0]["tasks"][task]["outputs"]
    samples = []
    for i in pick_prompts(prompts, per_mode):
        p = prompts[i]
        row: dict[str, Any] = {"prompt": i, "mode": p["mode"], "text": p["text"]}
        wavs = {}
        for name, label in MODELS:
            if name not in outputs:
                row[name] = {"skipped": f"no {task} outputs from the {name} run"}
                continue
            glob, sem, finished = tokens_to_decode(p, outputs[name][i]["tokens"])
            stem = f"{i:02d}-{p['mode']}-{name}"
            entry: dict[str, Any] = {"semantic_tokens": len(sem), "global_tokens": len(glob), "finished": finished}
            try:
                t0 = time.perf_counter()
                wav = codec.decode(glob, sem)
                entry["decode_s"] = round(time.perf_counter() - t0, 4)
            except CodecInputError as e:
                entry["skipped"] = str(e)
                row[name] = entry
                continue
            write_wav(folder / f"{stem}.wav", wav)
            write_spectrogram(folder / f"{stem}.png", wav, f"{label} · prompt {i} · {p['mode']}")
            entry |= {"wav": f"{stem}.wav", "png": f"{stem}.png", "samples": int(len(wav)),
                      "seconds": len(wav) / SAMPLE_RATE}
            wavs[name] = wav
            row[name] = entry
        if len(wavs) == 2:
            b, q = wavs["baseline"], wavs["quantized"]
            row["duration_ratio"] = len(q) / len(b)
            row["log_spectral_distance_db"] = log_spectral_distance_db(b, q)
        samples.append(row)
    info = codec_info(codec)
    result = {
        "codec": info, "random_weights": codec.random_weights, "task": task, "per_mode": per_mode,
        "page": f"{folder.name}/index.html", "folder": folder.name, "samples": samples,
        "written": sum(1 for s in samples for n, _ in MODELS if "wav" in s.get(n, {})),
        "skipped": sum(1 for s in samples for n, _ in MODELS if "skipped" in s.get(n, {})),
        "hop_samples": HOP, "sample_rate": SAMPLE_RATE,
    }
    result["speaker"] = score_pairs(folder, samples, codec.random_weights)
    (folder / "index.html").write_text(render_html(result))
    return result


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.5em;vertical-align:top}
th{background:#f3f3f3}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em;margin:1em 0}
.text{max-width:16em}.skip{color:#a33}img{display:block;max-width:100%;margin-top:.3em}audio{width:100%}
.meta{color:#555;font-size:.85em}"""


def _cell(entry: dict[str, Any]) -> str:
    if "wav" not in entry:
        return f'<td class="skip">skipped: {html.escape(entry.get("skipped", "?"))}</td>'
    meta = (f'{entry["seconds"]:.2f} s · {entry["semantic_tokens"]} semantic tokens'
            + ("" if entry.get("finished") else " · no EOS (runaway)"))
    return (f'<td><audio controls preload="none" src="{html.escape(entry["wav"])}"></audio>'
            f'<div class="meta">{meta} · <a href="{html.escape(entry["wav"])}">{html.escape(entry["wav"])}</a></div>'
            f'<img alt="spectrogram {html.escape(entry["wav"])}" src="{html.escape(entry["png"])}"></td>')


def render_html(res: dict[str, Any]) -> str:
    c = res["codec"]
    warn = ('<p class="warn"><b>The codec has random weights.</b> This is the embedded BiCodec (Spark-TTS\'s '
            'architecture and configuration, seeded random weights): every file below is noise to the ear. '
            'Durations, plumbing and timings are real; put Spark-TTS-0.5B at pretrained_models/ to hear speech.</p>'
            if res["random_weights"] else
            f'<p>Decoded with the model\'s own BiCodec ({html.escape(c["folder"])}).</p>')
    rows = []
    for s in res["samples"]:
        extra = ""
        if s.get("log_spectral_distance_db") is not None:
            extra = (f'<div class="meta">INT8/BF16 duration {s["duration_ratio"]:.2f}x · '
                     f'log-spectral distance {s["log_spectral_distance_db"]:.1f} dB'
                     + (f' · speaker similarity {s["speaker_similarity"]:.3f}' if "speaker_similarity" in s else "")
                     + '</div>')
        rows.append(f'<tr><td>{s["prompt"]}</td><td>{s["mode"]}</td><td class="text">{html.escape(s["text"])}{extra}'
                    f'</td>{_cell(s.get("baseline", {}))}{_cell(s.get("quantized", {}))}</tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Spark-TTS audio samples: BF16 vs INT8</title>
<style>{_CSS}</style></head><body>
<h1>Audio samples: BF16 vs INT8</h1>
{warn}
<p class="meta">Greedy outputs of held-out prompts ({res["per_mode"]} per mode), decoded with BiCodec
({html.escape(c["implementation"])}, {c["device"]}); 16 kHz mono, 16-bit PCM; length = semantic tokens / 50 s.
{res["written"]} files written, {res["skipped"]} skipped.</p>
{html_summary(res.get("speaker"))}
<table><thead><tr><th>#</th><th>mode</th><th>text</th><th>BF16 (baseline)</th><th>INT8 (quantized)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


