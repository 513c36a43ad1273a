"""report.md's audio sections and the statistics of streamed requests (pure over result dicts)."""

from __future__ import annotations

from typing import Any

from spark_quant.reporting.stats import bootstrap_ci


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


def render_stream(res: dict[str, Any]) -> list[str]:
    lines = ["## Streamed audio: time to first audio with BiCodec", ""]
    if res.get("skipped_all"):
        return lines + [f"Not measured: {res['skipped_all']}", ""]
    plan = res["plan"]
    codec = next((m["codec"] for m in res["models"].values() if m.get("ok")), None)
    lines += [f"Tokens: {res['token_source']}. First chunk after {plan.get('first_chunk', 50)} semantic tokens, "
              "later chunks twice the previous (at most 200), each decoded with 10 tokens of left context by one "
              "codec thread shared by all requests while the LLM generates"
              + (f", which decodes the chunks queued meanwhile in one batched call (at most {res['codec_batch']})"
                 if res.get("codec_batch", 1) > 1 else "")
              + (", taking the chunk whose playback is due first (deadline order)"
                 if res.get("codec_order") == "deadline" else "") + ". First audio = request sent to first "
              "chunk decoded (LLM + codec). Underrun: playback from the first chunk on stalls for a later one. "
              f"{res['requests_at_c1']} sequential requests at c=1; c requests at once above.", ""]
    if codec:
        lines += [f"Codec: {codec['implementation']} on {codec['device']}"
                  + (" (**random weights**: timing only)" if codec["random_weights"] else ""), ""]
    return lines + stream_table(res["models"]) + [""]


def speaker_lines(sp: dict[str, Any] | None) -> list[str]:
    """The speaker-similarity paragraph (``audio.speaker`` of results.json; none for older results)."""
    if not sp:
        return []
    if "skipped" in sp:
        return [f"Speaker similarity: not measured ({sp['skipped']}).", ""]
    s = sp["similarity"]
    value = "–" if s["value"] is None else f"{s['value']:.3f}"
    ci = " (no interval: n < 2)" if s["low"] is None else f" [{s['low']:.3f}, {s['high']:.3f}] (95% bootstrap)"
    warn = f" **{sp['note'][0].upper()}{sp['note'][1:]}.**" if sp.get("random_weights") else ""
    extra = (f"; the voice detector found no voice in {sp['no_voice_files']} of {sp['files']} files (embedded "
             "untrimmed)") if sp.get("no_voice_files") else ""
    return [f"Speaker similarity BF16 vs INT8: mean {value}{ci}, n = {s['n']} pairs.{warn} Per pair: the "
            f"{sp['metric']}, by {sp['model']}{extra}. {sp['reference'][0].upper()}{sp['reference'][1:]}.", ""]


def render_samples(res: dict[str, Any]) -> list[str]:
    """report.md's audio section (links relative to the results folder)."""
    if res.get("skipped_all"):
        return ["## Audio samples", "", f"Not written: {res['skipped_all']}", ""]
    d = res["folder"]
    lines = ["## Audio samples", ""]
    if res["random_weights"]:
        lines += ["**The codec has random weights** (the embedded BiCodec: Spark-TTS's architecture and "
                  "configuration, seeded random weights), so these files are noise to the ear; the durations and "
                  "the plumbing are real.", ""]
    lines += [f"[Players and spectrograms]({res['page']}) · {res['written']} WAV files, {res['skipped']} skipped · "
              f"codec: {res['codec']['implementation']} on {res['codec']['device']}", "",
              *speaker_lines(res.get("speaker")),
              "| # | mode | text | BF16 | INT8 | INT8/BF16 duration | log-spectral distance (dB) | "
              "speaker similarity |",
              "|---|---|---|---|---|---|---|---|"]

    def link(e: dict[str, Any]) -> str:
        if "wav" not in e:
            return f"skipped: {e.get('skipped', '?')}"
        return f"[{e['seconds']:.2f} s]({d}/{e['wav']})"

    for s in res["samples"]:
        text = s["text"].replace("|", "\\|")
        text = text if len(text) <= 40 else text[:39] + "…"
        dist = s.get("log_spectral_distance_db")
        ratio = s.get("duration_ratio")
        sim = s.get("speaker_similarity")
        lines.append(f"| {s['prompt']} | {s['mode']} | {text} | {link(s.get('baseline', {}))} | "
                     f"{link(s.get('quantized', {}))} | {'–' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'–' if dist is None else f'{dist:.1f}'} | {'–' if sim is None else f'{sim:.3f}'} |")
    return lines + [""]
