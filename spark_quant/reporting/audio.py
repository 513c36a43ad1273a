"""report.md's audio sections and the statistics of streamed requests (pure over result dicts)."""

from __future__ import annotations

from typing import Any

from spark_quant.reporting.stats import bootstrap_ci, paired_ci, pct, rate_ci


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


def level_label(row: dict[str, Any]) -> str:
    """A row's concurrency, with its codec arm and round when it is one run of a paired arm comparison."""
    c = str(row["concurrency"])
    return c if row.get("arm") is None else f"{c} ({row['arm']}, round {row['round'] + 1})"


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
                    f"| {label.get(name, name)} | {level_label(row)} | {mode} | {n} | "
                    f"{_ms(s['first_audio_s'])}{_ci_ms(s['first_audio_s'])} | {_ms(s['first_chunk_tokens_s'])} | "
                    f"{_ms(s['first_chunk_codec_s'])} | {'–' if share is None else f'{share:.0%}'} | "
                    f"{rtf['p50']:.2f}{rtf_ci} | {s['codec_rtf']['p50']:.2f} | "
                    f"{s['requests_with_underrun']}/{n} | {_ms(s['underrun_s'])} |")
    return lines


def compare_arms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The codec arms of one model at one concurrency (rows with ``arm`` and ``round``, ``audio.stream_pool``),
    pooled over their rounds: requests with an underrun (Wilson interval), first audio p50 (bootstrap) and
    p99, codec wait p50, per-round underrun counts; and each arm against the first one, paired by round and
    request (the same prompts): the difference in the share of requests that underran and the ratio of mean
    first audio, each with a paired bootstrap interval over requests."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    ref_label = next(iter(arms), None)

    def by_key(rs: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any] | None]:
        return {(row["round"], i): (None if "skipped" in r else r)
                for row in rs for i, r in enumerate(row["requests"])}

    ref = by_key(arms[ref_label]) if ref_label else {}
    out = []
    for label, rs in arms.items():
        ok = [r for row in rs for r in row["requests"] if "skipped" not in r]
        k = sum(1 for r in ok if r["underruns"])
        fa = [r["first_audio_s"] for r in ok]
        lo, hi = bootstrap_ci(fa)
        entry = {"arm": label, "codec_order": rs[0].get("codec_order"), "codec_batch": rs[0].get("codec_batch"),
                 "rounds": len(rs), "n": len(ok), "underrun": rate_ci(k, len(ok)),
                 "underrun_per_round": [sum(1 for r in row["requests"] if r.get("underruns")) for row in rs],
                 "first_audio_p50_s": {"value": pct(fa, 0.5), "low": lo, "high": hi, "n": len(fa)},
                 "first_audio_p99_s": pct(fa, 0.99),
                 "codec_wait_p50_s": pct([r["codec_wait_s"] for r in ok], 0.5),
                 "calls": sum(row["codec_calls"]["n"] for row in rs),
                 "chunks": sum(row["codec_calls"]["chunks"] for row in rs)}
        if label != ref_label:
            mine = by_key(rs)
            keys = [key for key in mine if mine[key] and ref.get(key)]
            entry["vs"] = ref_label
            entry["underrun_diff"] = paired_ci([float(bool(ref[key]["underruns"])) for key in keys],
                                               [float(bool(mine[key]["underruns"])) for key in keys])
            entry["first_audio_ratio"] = paired_ci([ref[key]["first_audio_s"] for key in keys],
                                                   [mine[key]["first_audio_s"] for key in keys], kind="ratio")
        out.append(entry)
    return out


def _iv(d: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
    if not d or d.get("value") is None:
        return "–"
    v = fmt.format(d["value"])
    return v if d.get("low") is None else f"{v} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def arm_table(models: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: each model's codec arms at each concurrency, pooled over rounds, and paired with the first."""
    lines = ["| model | c | arm (order, batch) | rounds | n | requests with underrun [95% CI] | per round | "
             "first audio p50 ms [95% CI] | p99 ms | codec wait p50 ms | vs first arm: underrun share diff "
             "[95% CI] | mean first audio ratio [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    any_arm = False
    for name, m in models.items():
        levels: dict[int, list[dict[str, Any]]] = {}
        for row in m.get("rows", []):
            if row.get("arm") is not None:
                levels.setdefault(row["concurrency"], []).append(row)
        for c, rows in levels.items():
            for e in compare_arms(rows):
                any_arm = True
                u = e["underrun"]
                ms = {k: (None if e["first_audio_p50_s"][k] is None else e["first_audio_p50_s"][k] * 1000)
                      for k in ("value", "low", "high")}
                lines.append(
                    f"| {name} | {c} | {e['arm']} ({e['codec_order']}, {e['codec_batch']}) | {e['rounds']} | {e['n']} | "
                    f"{u.get('k', 0)} = {_iv(u)} | {', '.join(map(str, e['underrun_per_round']))} | "
                    f"{_iv(ms, '{:,.0f}')} | {e['first_audio_p99_s'] * 1000:,.0f} | "
                    f"{e['codec_wait_p50_s'] * 1000:,.0f} | "
                    f"{_iv(e.get('underrun_diff'), '{:+.3f}') if 'vs' in e else '(reference)'} | "
                    f"{_iv(e.get('first_audio_ratio')) if 'vs' in e else '(reference)'} |")
    return lines if any_arm else []


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
              + {"deadline": ", taking the chunk whose playback is due first (deadline order)",
                 "playing": ", taking chunks of streams already playing first (playing order)"}.get(
                  res.get("codec_order"), "") + ". First audio = request sent to first "
              "chunk decoded (LLM + codec). Underrun: playback from the first chunk on stalls for a later one"
              + (f" (playback starts {plan['prebuffer_s'] * 1000:.0f} ms after the first chunk: the listener's "
                 "prebuffer, not counted in first audio)" if plan.get("prebuffer_s") else "") + ". "
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
