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

from spark_quant.artifacts import (
    MANIFEST,
    fingerprint,
    link_or_copy,
    read_manifest,
    require_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from spark_quant.errors import StageFailed, UserError
from spark_quant.hub import resolve_token, upload
from spark_quant.outputs import begin_stage, stage_folder
from spark_quant.reporting.card import card_context, render_card

RELEASE_ROOT = Path("build/release")
PROXY_LICENSE = "apache-2.0"  # the embedded proxy's random weights are this project's (Apache-2.0)
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
            if verdict.get("status") == "INCONCLUSIVE":  # an interval holds a threshold: more outputs decide it
                raise StageFailed(f"{path}: the eval's gates are inconclusive ({'; '.join(verdict['inconclusive'])})"
                                  "; rerun eval with more eval.num_prompts / eval.samples_per_prompt, or pass --force")
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


def _proxy_note(ckpt_dir: Path) -> str | None:
    """The stand-in's one-line description from its config.yaml (descriptive only)."""
    try:
        return (yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text()) or {}).get("spark_quant_proxy")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _card_code() -> str:
    """A fingerprint of what renders the card (this stage, the card module, its template)."""
    from spark_quant.reporting import card

    parts = [Path(__file__), Path(card.__file__), Path(card.__file__).with_name("card.md.j2")]
    return fingerprint([p.read_text(encoding="utf-8") for p in parts])


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
              "card_code": _card_code()}  # card logic changed: restage
    if begin_stage(out, "publish", inputs, overwrite, derived, sources=[ckpt_dir, results_dir],
                   why="inputs unchanged, not restaged"):
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
        llm_config = json.loads((Path(ckpt_dir) / "LLM" / "config.json").read_text())
        proxy = {"note": _proxy_note(ckpt_dir), "weights": proxy_kind(ckpt_dir, qman)} if is_proxy else None
        ctx = card_context(checked, llm_config, repo_id, license_, proxy, revision, layout, exp_file,
                           default_name=Path(ckpt_dir).name)
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


# --- the stage -----------------------------------------------------------------------
def publish(exp, repo_id: str, ckpt_dir: Path | None = None, results_dir: Path | None = None, out: Path | None = None,
            dry_run: bool = False, force: bool = False, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, license_: str | None = None, retries: int = 3,
            overwrite: bool = False) -> dict[str, Any]:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise UserError(f"--repo-id {repo_id!r}: expected NAMESPACE/NAME, e.g. you/Spark-TTS-0.5B-W8A8-int8")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # the hub's own rule (no "--" or "..", at most 96 characters, ...), before anything is staged
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--repo-id {repo_id!r}: the hub would refuse it ({str(e).splitlines()[0][:200]})") from None
    ckpt_dir, _ = exp.folder(ckpt_dir, exp.checkpoint_dir)
    results_dir, _ = exp.folder(results_dir, exp.results_dir)
    out, derived = exp.folder(out, RELEASE_ROOT / ckpt_dir.name)
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
