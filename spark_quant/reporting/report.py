"""Turning results.json into what people read: a terminal table, report.md and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spark_quant.reporting.audio import render_samples, render_stream
from spark_quant.reporting.fmt import ci_text
from spark_quant.reporting.fmt import num as _f
from spark_quant.reporting.gates import verdict_line
from spark_quant.reporting.metrics import METRICS, direction, format_ci
from spark_quant.reporting.speed_text import b1_interval_lines, by_repeat_lines
from spark_quant.reporting.speed_stats import by_concurrency


def summary_table(res: dict[str, Any]) -> str:
    sp = res.get("speed", {})
    lines = [f"{'':<26}{'baseline':>14}{'quantized':>14}{'ratio':>10}"]

    def row(label, key, fmt=".2f"):
        b, q = sp.get("baseline", {}).get(key), sp.get("quantized", {}).get(key)
        r = q / b if b and q else None
        lines.append(f"{label:<26}{_f(b, fmt):>14}{_f(q, fmt):>14}{_f(r, '.2f'):>10}")

    row("ms/token b1 sampled", "ms_per_token_sampled")
    row("ms/token b1 greedy", "ms_per_token_greedy")
    row("TTFT b1 (s)", "ttft_s", ".3f")
    bt = {r["concurrency"]: r for r in sp.get("baseline", {}).get("throughput", [])}
    qt = {r["concurrency"]: r for r in sp.get("quantized", {}).get("throughput", [])}
    for c in sorted(bt):
        b, q = bt[c]["tokens_per_s"], qt.get(c, {}).get("tokens_per_s")
        lines.append(f"{'tok/s @ c=' + str(c):<26}{_f(b, '.0f'):>14}{_f(q, '.0f'):>14}{_f(q / b if q else None):>10}")
    fid = res.get("fidelity") or {}
    for key in ("top1", "kl", "greedy_prefix", "valid_recovery"):
        m = METRICS[key]
        if fid.get(key):
            lines.append(f"{m.label:<26}{format_ci(fid[key], m.fmt)}")
    kc = res.get("kernel_check", {})
    if kc:
        lines.append(f"kernel: {', '.join(kc.get('selected') or ['(none logged)'])}")
    lines.append("verdict: " + verdict_line(res["verdict"]))
    return "\n".join(lines)


def render_fidelity(res: dict[str, Any]) -> list[str]:
    """The fidelity table (every number with its 95% interval and n, from ``metrics.METRICS``) and the gates."""
    fid = res.get("fidelity") or {}
    if not fid:
        return []
    out = ["## Fidelity with 95% intervals", "",
           "n = prompts for bootstrap intervals (resampling prompts), outputs for Wilson intervals of rates; "
           "q−b and q/b are paired (same prompts, same seeds).", "",
           "| metric | unit | value [95% interval] | n | interval | direction |", "|---|---|---|---|---|---|"]
    for key, m in METRICS.items():
        ci = fid.get(key)
        if not ci or ci.get("value") is None:
            continue
        extra = f" (p5–p95 {_f(ci.get('p5'), '.3f')}–{_f(ci.get('p95'), '.3f')})" if "p5" in ci else ""
        out.append(f"| {m.label} | {m.unit} | {format_ci(ci, m.fmt, n=False)}{extra} | {ci.get('n')} | "
                   f"{ci.get('method')} | {direction(m)} |")
    gates = (res.get("verdict") or {}).get("gates") or []
    if gates:
        out += ["", "Gates (PASS: the whole interval clears the threshold; FAIL: the whole interval misses it; "
                "INCONCLUSIVE: it holds the threshold):", ""]
        out += [f"- **{g['status']}** {g['text']}" for g in gates]
    return out + [""]


def render_report(res: dict[str, Any]) -> str:
    s = res.get("settings", {})
    host = res.get("host", {})
    dev = host.get("gpu") or host.get("host_cpu")
    v = res["versions"]
    out = [
        f"# Evaluation: {res['experiment']}",
        "",
        f"- **Device**: {dev} ({res['device']}); driver {host.get('driver', '–')}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())),
        f"- **Commit**: {res.get('git_commit')}; created {res['created']}",
        f"- **Checkpoint**: recipe `{res['checkpoint']['recipe']}`, format `{res['checkpoint']['format']}`",
        f"- **Settings**: {s.get('max_new_tokens')} new tokens per timed request (ignore EOS), "
        f"sampling T={s.get('temperature')} top_k={s.get('top_k')} top_p={s.get('top_p')}, "
        f"max_model_len {s.get('max_model_len')}, {s.get('repeats')} interleaved repeat(s), "
        f"{s.get('num_prompts')} held-out prompts per mode",
        "",
        "## Verdict",
        "",
        "**" + verdict_line(res["verdict"]).replace(":", "**:", 1) + ("**" if res["verdict"].get("passed") else ""),
        "",
    ]
    kc = res.get("kernel_check")
    if kc:
        out += ["## Kernel", "", f"Expected `{kc['expected']}`; vLLM selected: "
                + (", ".join(f"`{k}`" for k in kc["selected"]) or "nothing logged"), ""]
    sp = res.get("speed", {})
    if sp:
        out += ["## Latency at concurrency 1 (streamed, medians over repeats)", "",
                "| | baseline | quantized | quantized / baseline |", "|---|---|---|---|"]
        for label, key, fmt in (("ms/token, sampled", "ms_per_token_sampled", ".3f"),
                                ("ms/token, greedy", "ms_per_token_greedy", ".3f"),
                                ("time to first token (s)", "ttft_s", ".4f"),
                                ("time to 50 tokens = 1 s of audio (s)", "time_to_first_audio_s", ".4f"),
                                ("inter-token latency p50 (ms)", "itl_ms_p50", ".3f"),
                                ("inter-token latency p90 (ms)", "itl_ms_p90", ".3f"),
                                ("inter-token latency p99 (ms)", "itl_ms_p99", ".3f"),
                                ("RTF (generation s / audio s)", "rtf_b1", ".4f")):
            b, q = sp.get("baseline", {}).get(key), sp.get("quantized", {}).get(key)
            out.append(f"| {label} | {_f(b, fmt)} | {_f(q, fmt)} | {_f(q / b if b and q else None)} |")
        runs_b = sp.get("baseline", {}).get("ms_per_token_sampled_runs", [])
        runs_q = sp.get("quantized", {}).get("ms_per_token_sampled_runs", [])
        out += ["", f"Per-repeat ms/token (sampled): baseline {[_f(x, '.3f') for x in runs_b]}, "
                f"quantized {[_f(x, '.3f') for x in runs_q]}.", ""]
        out += by_repeat_lines(res.get("ratios") or {})
        out += b1_interval_lines(sp)
        out += ["## Throughput by concurrency (fixed length, sampled)", "",
                "| concurrency | baseline tok/s | quantized tok/s | ratio (3+ repeats: per-repeat median [95% CI]) | audio s/s base / quant "
                "| RTF p50 base / quant | RTF p99 base / quant | TTFT p99 base / quant (s) |",
                "|---|---|---|---|---|---|---|---|"]
        bt = sp.get("baseline", {}).get("throughput", [])
        qt = sp.get("quantized", {}).get("throughput", [])
        by_c = by_concurrency((res.get("ratios") or {}).get("by_repeat", {}).get("tokens_per_s"))
        for b, q in zip(bt, qt):
            rc = by_c.get(b["concurrency"]) or {}
            ratio_text = (f"{ci_text(rc)} (n = {rc['n']} repeats)" if rc.get("lo") is not None
                          else _f(q['tokens_per_s'] / b['tokens_per_s']))
            out.append(f"| {b['concurrency']} | {_f(b['tokens_per_s'], '.0f')} | {_f(q['tokens_per_s'], '.0f')} | "
                       f"{ratio_text} | {_f(b['audio_s_per_s'], '.1f')} / "
                       f"{_f(q['audio_s_per_s'], '.1f')} | {_f(b['rtf_p50'], '.3f')} / {_f(q['rtf_p50'], '.3f')} | "
                       f"{_f(b['rtf_p99'], '.3f')} / {_f(q['rtf_p99'], '.3f')} | "
                       f"{_f(b['ttft_p99_s'], '.3f')} / {_f(q['ttft_p99_s'], '.3f')} |")
        out.append("")
        eng = res.get("engines", {})
        out += ["## Engines", "", "| | dtype | quantization | weights loaded (GiB) | KV-cache tokens "
                "| max concurrency at max_model_len | engine start (s) | worker wall, all tasks (s) |",
                "|---|---|---|---|---|---|---|---|"]
        for name, e in eng.items():
            out.append(f"| {name} | {e.get('dtype')} | {e.get('quantization') or '–'} | "
                       f"{_f(e.get('weights_gib_loaded'), '.2f')} | {e.get('kv_cache_tokens') or '–'} "
                       f"| {_f(e.get('max_concurrency_at_max_len'), '.1f')} | {_f(e.get('load_seconds'), '.0f')} "
                       f"| {_f(e.get('load_wall_s'), '.0f')} |")
        out.append("")
    rl = res.get("roofline")
    if rl:
        out += ["## Roofline (batch 1, greedy)", "",
                f"Bytes one decode step must read: the weights as served plus the KV cache at the timed requests' "
                f"mean context ({rl['context_tokens']:.0f} tokens, {rl['kv_bytes_per_step'] / 1e6:.1f} MB). "
                + ("Ceiling: this device's measured device-to-device copy bandwidth (bytes read + written)."
                   if rl.get("baseline", {}).get("device_GBps") else "No bandwidth ceiling is measured on CPU."), "",
                "| | weight bytes / step | of which embedding/lm_head | ms/token | achieved GB/s | device GB/s "
                "| floor (ms) | measured / floor |", "|---|---|---|---|---|---|---|---|"]
        for name in ("baseline", "quantized"):
            r = rl.get(name)
            if r:
                out.append(f"| {name} | {r['weight_bytes_per_step'] / 1e6:.0f} MB | {r['lm_head_bytes'] / 1e6:.0f} MB | "
                           f"{_f(r['ms_per_token_greedy'], '.3f')} | {_f(r['achieved_GBps'], '.0f')} | "
                           f"{_f(r['device_GBps'], '.0f')} | {_f(r['floor_ms'], '.3f')} | "
                           f"{_f(r['times_floor'], '.1f') + 'x' if r['times_floor'] else '–'} |")
        out += ["", _roofline_words(rl), ""]
    if res.get("step_profile"):
        out += render_step_profile(res["step_profile"])
    nat_b = sp.get("baseline", {}).get("natural") if sp else None
    nat_q = sp.get("quantized", {}).get("natural") if sp else None
    if nat_b and nat_q:
        out += [f"## Natural length (stop at <|im_end|>, limit {s.get('natural_max_tokens')} tokens)", "",
                "| | baseline | quantized |", "|---|---|---|",
                f"| output tokens per request, p50 | {_f(nat_b['output_tokens_p50'], '.0f')} | "
                f"{_f(nat_q['output_tokens_p50'], '.0f')} |",
                f"| ms/token at concurrency 1 | {_f(nat_b['ms_per_token_sampled'], '.3f')} | "
                f"{_f(nat_q['ms_per_token_sampled'], '.3f')} |",
                f"| highest concurrency with RTF p99 < {s.get('rtf_target')} | "
                f"{_f(nat_b['max_concurrency_rtf_p99_under_target'], 'd')} | "
                f"{_f(nat_q['max_concurrency_rtf_p99_under_target'], 'd')} |"]
        for b, q in zip(nat_b["throughput"], nat_q["throughput"]):
            out.append(f"| tok/s at concurrency {b['concurrency']} | {_f(b['tokens_per_s'], '.0f')} | "
                       f"{_f(q['tokens_per_s'], '.0f')} |")
        out.append("")
    if sp:
        fa = {n: sp.get(n, {}).get("first_audio_by_mode_s", {}) for n in ("baseline", "quantized")}
        rows = []
        for mode in ("controllable", "clone"):
            cells = []
            for n in ("baseline", "quantized"):
                m = fa[n].get(mode)
                cells.append("–" if not m else (f"{_f(m['p50'], '.3f')} s ({m['reached']}/{m['requests']} reached)"
                                                if m["reached"] else f"never (0/{m['requests']} reached 50)"))
            rows.append(f"| {mode} | {cells[0]} | {cells[1]} |")
        out += ["## Time to first audio (50 semantic tokens = 1 s), by prompt mode", "",
                "| mode | baseline | quantized |", "|---|---|---|", *rows,
                "", "A model that never writes 50 semantic tokens (an untrained proxy) never reaches it; the "
                "latency table's 'time to 50 tokens' is the same clock on any token.", "",
                f"Highest concurrency whose RTF p99 stays under {s.get('rtf_target')} (fixed length, of the "
                f"concurrencies measured): baseline "
                f"{_f(sp.get('baseline', {}).get('max_concurrency_rtf_p99_under_target'), 'd', 'none')}, quantized "
                f"{_f(sp.get('quantized', {}).get('max_concurrency_rtf_p99_under_target'), 'd', 'none')}.", ""]
    out += render_fidelity(res)
    sim = res.get("similarity")
    if sim:
        g, tf = sim["greedy"], sim["teacher_forced"]
        sb, sq = sim["sampled"]["baseline"], sim["sampled"]["quantized"]
        out += ["## Output similarity (held-out prompts, never in calibration)", "",
                "| metric | value |", "|---|---|",
                f"| greedy: mean share of tokens before the first divergence | {_f(g['prefix_agreement_mean'], '.3f')} |",
                f"| greedy: exact-match rate | {_f(g['exact_match_rate'], '.3f')} |",
                f"| greedy: position-wise token agreement | {_f(g['token_agreement_mean'], '.3f')} |",
                f"| greedy: global-token agreement (controllable) | {_f(g['global_token_agreement'], '.3f')} |",
                f"| teacher-forced top-1 agreement | {_f(tf['top1_agreement'], '.3f')} |",
                f"| teacher-forced KL(base‖quant), mean / p99 (nats) | {_f(tf['kl_base_quant_mean'], '.4f')} / "
                f"{_f(tf['kl_base_quant_p99'], '.4f')} |",
                f"| teacher-forced NLL(quant) − NLL(base), mean (nats) | {_f(tf['nll_delta_mean'], '.4f')} |",
                f"| sampled: valid-output rate base / quant | {_f(sb['valid_rate'], '.3f')} / {_f(sq['valid_rate'], '.3f')} |",
                f"| sampled: runaway rate base / quant | {_f(sb['runaway_rate'], '.3f')} / {_f(sq['runaway_rate'], '.3f')} |",
                f"| sampled: audio-duration ratio quant/base mean (p5–p95) | "
                f"{_f(sim['sampled']['duration_ratio']['mean'])} ({_f(sim['sampled']['duration_ratio']['p5'])}–"
                f"{_f(sim['sampled']['duration_ratio']['p95'])}) |",
                f"| sampled: semantic-token distribution distance (total variation) | "
                f"{_f(sim['sampled']['semantic_distribution_tv'], '.3f')} |", ""]
        for mode in ("controllable", "clone"):
            m = sim.get(f"greedy_{mode}")
            if m:
                out.append(f"- greedy, {mode} prompts: prefix agreement {_f(m['prefix_agreement_mean'], '.3f')}, "
                           f"exact match {_f(m['exact_match_rate'], '.3f')}")
        if sb["problems"]:
            out.append(f"- baseline sampled-output problems seen: {', '.join(sb['problems'])}")
        out.append("")
    if res.get("audio"):
        out += render_samples(res["audio"])
    if res.get("audio_stream"):
        out += render_stream(res["audio_stream"])
    out += ["## Plots", "", "![latency CDF](latency_cdf.png) ![throughput](throughput.png) "
            "![agreement by position](agreement.png)", ""]
    return "\n".join(out)


def render_step_profile(prof: dict[str, Any]) -> list[str]:
    """One decode step's time by kernel kind (ms per step), per model, concurrency and sampling mode."""
    cats = ("gemm_int8", "gemm_16bit", "act_quant", "attention", "sampling", "copies", "other")
    out = ["## Where a decode step's time goes", "",
           "Per decode step, from the difference of two generation lengths (prefill removed). GPU columns are "
           "kernel time summed by kind (torch profiler); busy = union of kernel intervals; gaps = wall - busy "
           "(the GPU waiting for the CPU). `lm_head alone` = the head GEMM at this batch timed by itself.", "",
           "| model | c | mode | wall ms | GPU busy | gaps | " + " | ".join(cats) + " | lm_head alone | kernels |",
           "|" + "---|" * (8 + len(cats))]
    for name, r in prof.items():
        if not r.get("ok"):
            out.append(f"| {name} | – | – | failed: {r.get('error', '?')[:120]} |" + " |" * (4 + len(cats)))
            continue
        for row in r["rows"]:
            ms = row.get("ms_by_category", {})
            out.append(f"| {name} | {row['concurrency']} | {row['mode']} | {_f(row['wall_ms_per_step'], '.3f')} | "
                       f"{_f(row.get('gpu_busy_ms'), '.3f')} | {_f(row.get('gaps_ms'), '.3f')} | "
                       + " | ".join(_f(ms.get(c), '.3f') for c in cats)
                       + f" | {_f(row.get('lm_head_alone_ms'), '.3f')} | {_f(row.get('kernels_per_step'), '.0f')} |")
    return out + [""] + render_cpu_phases(prof)


def render_speed_matrix(summary: dict[str, dict[str, Any]], conc: list[int]) -> list[str]:
    """One row per served variant (``evaluate.speed_summary`` + ``weights_gib_loaded``); the first is
    the reference of the ratio column."""
    ref = next(iter(summary.values()), {})
    rtps = {r["concurrency"]: r["tokens_per_s"] for r in ref.get("throughput", [])}
    lines = ["| variant | weights GiB | b1 ms/token sampled | runs | b1 ms/token greedy | "
             + " | ".join(f"tok/s c={c}" for c in conc) + f" | tok/s c={conc[-1]} ratio |",
             "|" + "---|" * (5 + len(conc) + 1)]
    for label, s in summary.items():
        if "error" in s and "throughput" not in s:
            lines.append(f"| {label} | failed: {str(s['error'])[:150]} |" + " |" * (4 + len(conc)))
            continue
        tps = {r["concurrency"]: r["tokens_per_s"] for r in s["throughput"]}
        runs_s = "/".join(f"{x:.3f}" for x in s["ms_per_token_sampled_runs"] if x is not None)
        ratio = tps.get(conc[-1]) / rtps[conc[-1]] if rtps.get(conc[-1]) and tps.get(conc[-1]) else None
        lines.append(f"| {label} | {_f(s.get('weights_gib_loaded'))} | {_f(s['ms_per_token_sampled'], '.3f')} | "
                     f"{runs_s} | {_f(s['ms_per_token_greedy'], '.3f')} | "
                     + " | ".join(_f(tps.get(c), ".0f") for c in conc) + f" | {_f(ratio)} |")
    return lines


def render_cpu_phases(prof: dict[str, Any]) -> list[str]:
    """The host side of the same steps: vLLM's phases, inclusive ms per step, in the order the step profiler
    lists them (serving/stepprof.py's CPU_PHASES)."""
    rows = [(name, row) for name, r in prof.items() if r.get("ok") for row in r["rows"] if row.get("cpu_phases")]
    if not rows:
        return []
    seen = list(dict.fromkeys(lb for _, row in rows for lb in row["cpu_phases"]))
    out = ["### The host side of a decode step", "",
           "Host (CPU) ms per decode step in vLLM's own methods, timed by wrapping them (inclusive: a phase "
           "contains what it calls), same two-length difference. With async scheduling the CPU prepares the next "
           "step while the GPU runs this one; `wait for GPU result` is the time the host had nothing to do. "
           "When the engine step minus that wait is close to the wall time, the step is CPU-bound and a faster "
           "GPU path cannot shorten it.", "",
           "| model | c | mode | wall ms | " + " | ".join(lb.strip() for lb in seen) + " |",
           "|" + "---|" * (4 + len(seen))]
    for name, row in rows:
        ph = row["cpu_phases"]
        out.append(f"| {name} | {row['concurrency']} | {row['mode']} | {_f(row['wall_ms_per_step'], '.3f')} | "
                   + " | ".join(_f(ph.get(lb, {}).get("ms"), ".3f") for lb in seen) + " |")
    return out + [""]


def _roofline_words(rl: dict[str, Any]) -> str:
    b, q = rl.get("baseline"), rl.get("quantized")
    if not (b and q and b["ms_per_token_greedy"] and q["ms_per_token_greedy"]):
        return ""
    byte_ratio = q["bytes_per_step"] / b["bytes_per_step"]
    time_ratio = q["ms_per_token_greedy"] / b["ms_per_token_greedy"]
    floor = ""
    if b.get("times_floor") and q.get("times_floor"):
        floor = (f" The baseline's step takes {b['times_floor']:.1f}x its bandwidth floor ({b['floor_ms']:.3f} ms) "
                 f"and the quantized one's {q['times_floor']:.1f}x ({q['floor_ms']:.3f} ms).")
    if time_ratio > 0.5 * (1 + byte_ratio):
        verdict = ("The step is not bound by reading weights: fixed per-step costs (kernel launches, activation "
                   "quantization, sampling, scheduling) dominate it, so halving the weight bytes cannot halve "
                   "latency, and the extra INT8 work (per-token activation quantization) can make it slower.")
    else:
        verdict = "The step follows the bytes it reads, so INT8 pays off in latency."
    return (f"The quantized checkpoint reads {byte_ratio:.2f}x the baseline's bytes per decode step "
            f"({q['lm_head_bytes'] / q['bytes_per_step']:.0%} of them the 16-bit embedding/lm_head) and its "
            f"batch-1 step takes {time_ratio:.2f}x the time.{floor} {verdict}")


def render_plots(res: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = res.get("speed", {})
    colors = {"baseline": "#1f77b4", "quantized": "#d62728"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in res["raw"].items():
        itl = []
        for r in run:
            if r.get("ok"):
                for req in r["tasks"]["latency"]["requests"]:
                    st = req["stamps"]
                    itl += [(t1 - t0) * 1000 / (n1 - n0) for (t0, n0), (t1, n1) in zip(st, st[1:])]
        if itl:
            itl.sort()
            ax.plot(itl, [i / len(itl) for i in range(len(itl))], label=name, color=colors[name])
    ax.set_xlabel("inter-token latency (ms), concurrency 1")
    ax.set_ylabel("CDF")
    ax.set_xscale("log")
    ax.legend()
    ax.set_title(f"{res['experiment']}: streamed latency")
    fig.tight_layout()
    fig.savefig(folder / "latency_cdf.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, s in sp.items():
        rows = s["throughput"]
        cs = [r["concurrency"] for r in rows]
        a1.plot(cs, [r["tokens_per_s"] for r in rows], "o-", label=name, color=colors[name])
        a2.plot(cs, [r["rtf_p99"] for r in rows], "o-", label=name, color=colors[name])
    for a, yl in ((a1, "output tokens/s"), (a2, "RTF p99 (50 tokens = 1 s audio)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent requests")
        a.set_ylabel(yl)
        a.legend()
    fig.suptitle(f"{res['experiment']}: throughput and RTF vs concurrency")
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    by_pos = res.get("similarity", {}).get("greedy", {}).get("agreement_by_position", [])
    if by_pos:
        ax.plot(range(len(by_pos)), by_pos, color=colors["quantized"])
    ax.set_xlabel("output position (greedy)")
    ax.set_ylabel("share of prompts where quantized = baseline")
    ax.set_ylim(0, 1.05)
    ax.set_title("greedy agreement by output position")
    fig.tight_layout()
    fig.savefig(folder / "agreement.png", dpi=110)
    plt.close(fig)
