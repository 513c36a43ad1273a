"""Issue 13: nothing a user types may destroy data or silently give wrong results (inputs, folders, make flags).

Each test is a row of docs/errors.md. The CLI runs in-process in a throwaway project tree (no model work beyond
reading a tokenizer), and every test hashes the whole tree before and after: a refused input changes nothing,
an accepted one only the stage's own folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from safety_helpers import FAST, assert_only_changed, cli, make_project, one_line_error, tree_state

from spark_quant import spark
from spark_quant.artifacts import write_manifest
from spark_quant.config import load_experiment
from spark_quant.errors import UserError


def _fake_eval(folder: Path) -> Path:
    """A finished eval folder (a skipped one is enough for a comparison row)."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"experiment": folder.name, "skipped": "test", "checkpoint": {}}))
    write_manifest(folder, "eval", {}, {"test": 1}, time.time())
    return folder


# --- deletes data --------------------------------------------------------------------------------------------
def test_compare_and_sweep_never_write_over_a_folder_or_file_they_did_not_make(tmp_path, monkeypatch, capsys):
    proj = make_project(tmp_path, monkeypatch)
    _fake_eval(proj / "eval/results/fake")
    before = tree_state(proj)
    for out in ("docs", "README.md", "experiments", "eval/results", "eval"):  # tracked files, a file, the inputs
        rc, _, err = cli(capsys, "compare", "eval/results/fake", "--out", out)
        one_line_error(rc, err, out)
    rc, _, err = cli(capsys, "sweep", "experiments/spark-tts_w8a8_int8.yaml", "--out", "docs")
    one_line_error(rc, err, "docs", "not a folder spark-quant made")  # refused before any stage runs
    assert_only_changed(proj, before)
    # a new folder, then the same folder again (its own: replaced) are fine
    for _ in range(2):
        rc, _, err = cli(capsys, "compare", "eval/results/fake", "--out", "eval/sweeps/mine")
        assert rc == 0, err
    assert_only_changed(proj, before, "eval/sweeps")
    assert json.loads((proj / "eval/sweeps/mine/manifest.json").read_text())["stage"] == "compare"


def test_calibrate_never_writes_over_its_corpus_or_its_model_even_with_overwrite(tmp_path, monkeypatch, capsys,
                                                                                  tiny_proxy):
    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    before = tree_state(proj)
    for out in ("calibration/texts", "calibration", "model", "model/LLM"):
        rc, _, err = cli(capsys, "calibrate", "--model", "model", "--out", out, "--overwrite", *FAST)
        one_line_error(rc, err, "an input of calibrate", "choose another --out")
    assert_only_changed(proj, before)


@pytest.mark.parametrize("name", [".", "..", "../../escaped", "/tmp/abs-escaped", "a b", "a\x00b", "-x", ""])
def test_experiment_name_is_one_safe_folder_name(tmp_path, monkeypatch, capsys, tiny_proxy, name):
    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    (proj / "calibration/runs/keep").mkdir(parents=True)
    (proj / "calibration/runs/keep/f").write_text("x")
    before = tree_state(proj)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", "--set", f"name={name}", "--overwrite", *FAST)
    if name == "":  # empty = the file's name, as before
        assert rc == 0, err
        assert_only_changed(proj, before, "calibration/runs/spark-tts_w8a8_int8")
        return
    one_line_error(rc, err, "name: ")
    assert not Path("/tmp/abs-escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert_only_changed(proj, before)


# --- wrong results with exit 0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [1.0, True, "5"])
def test_reference_codes_must_be_integers(tmp_path, monkeypatch, capsys, tiny_proxy, code):
    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    ref = {"global": [1] * 31 + [code], "semantic": [1, 2], "text": "hi"}
    (proj / "refs.jsonl").write_text(json.dumps({"global": [1] * 32, "text": ""}) + "\n" + json.dumps(ref) + "\n")
    before = tree_state(proj)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", "--out", "cal", "--set", "calibration.references=refs.jsonl",
                     "--set", "calibration.num_samples=4", "--set", "calibration.clone_fraction=1")
    one_line_error(rc, err, "refs.jsonl: line 2", "is not an integer")
    assert_only_changed(proj, before)
    with pytest.raises(ValueError, match="not an integer"):
        spark.clone_prompt("x", [1] * 32, "t", [1, 2.0])


def test_duplicate_yaml_keys_are_errors_in_experiments_and_recipes(tmp_path, monkeypatch, capsys):
    proj = make_project(tmp_path, monkeypatch)
    (proj / "experiments/dup.yaml").write_text("name: dup\ncalibration:\n  num_samples: 8\ncalibration:\n  seed: 1\n")
    (proj / "recipes/dup.yaml").write_text(
        "quant_stage:\n  quant_modifiers:\n"
        "    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}\n"
        "    GPTQModifier: {targets: Linear, scheme: W4A16, ignore: [lm_head]}\n")
    (proj / "experiments/merge.yaml").write_text("base: &b {seed: 1}\ncalibration:\n  <<: *b\n  seed: 2\n")
    before = tree_state(proj)
    rc, out, _ = cli(capsys, "validate", "experiments/dup.yaml", "recipes/dup.yaml")
    assert rc == 1
    assert "experiments/dup.yaml: line 4: not valid YAML (duplicate key 'calibration' (first at line 2)" in out
    assert "recipes/dup.yaml: line 4: not valid YAML (duplicate key 'GPTQModifier' (first at line 3)" in out
    with pytest.raises(UserError, match="--set"):  # a merge key's override is not a duplicate: the unknown field is
        load_experiment(proj / "experiments/merge.yaml", ["--set"])
    with pytest.raises(UserError, match="base: unknown field"):
        load_experiment(proj / "experiments/merge.yaml")
    assert_only_changed(proj, before)


@pytest.mark.parametrize("line", ["hello <|im_end|> world", "a voice <|bicodec_global_5|>", "x <tool_call> y"])
def test_corpus_lines_with_special_token_strings_are_refused(tmp_path, monkeypatch, capsys, tiny_proxy, line):
    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    (proj / "c.txt").write_text(f"an ordinary line, <|not_a_token|> included\n{line}\n")
    before = tree_state(proj)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", "--out", "cal", "--set", "calibration.corpus=c.txt", *FAST)
    one_line_error(rc, err, "c.txt: line 2: contains", "special token")
    assert_only_changed(proj, before)


@pytest.mark.parametrize("item,field", [
    ("calibration.seed=9223372036854775808", "calibration.seed"), ("calibration.seed=-1", "calibration.seed"),
    ("proxy_seed=99999999999999999999", "proxy_seed"), ("calibration.num_samples=1000000000", "num_samples"),
    ("calibration.max_seq_length=10000000", "max_seq_length"), ("eval.concurrency=[1,100000]", "eval.concurrency"),
    ("eval.max_model_len=10000000", "eval.max_model_len"), ("calibration.num_references=100000000", "num_references"),
])
def test_out_of_range_numbers_are_field_errors_before_any_work(tmp_path, monkeypatch, capsys, item, field):
    proj = make_project(tmp_path, monkeypatch)
    before = tree_state(proj)
    rc, _, err = cli(capsys, "calibrate", "--model", "nonexistent-model", "--set", item)
    one_line_error(rc, err, field)  # the field, not the missing model: checked first
    assert_only_changed(proj, before)


# --- make flags ------------------------------------------------------------------------------------------------
def _make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args, "QUANT_PYTHON=qpy", "SERVE_PYTHON=spy"], cwd=ROOT,
                          capture_output=True, text=True, check=False)


def _lines(proc) -> list[str]:
    return [x for x in proc.stdout.replace("\\\n", " ").splitlines() if " -m spark_quant " in x]


def test_make_flags_mean_what_they_say():
    for off in ("0", "false", "no", "OFF", ""):
        assert "--overwrite" not in _lines(_make_n("calibrate", f"OVERWRITE={off}"))[0]
        pub = _lines(_make_n("publish", "REPO_ID=a/b", f"FORCE={off}", f"PRIVATE={off}", f"DRY_RUN={off}"))[0]
        assert not {"--force", "--private", "--dry-run"} & set(pub.split())
    for on in ("1", "true", "yes", "TRUE"):
        assert "--overwrite" in _lines(_make_n("calibrate", f"OVERWRITE={on}"))[0].split()
        pub = _lines(_make_n("publish", "REPO_ID=a/b", f"FORCE={on}", f"PRIVATE={on}", f"DRY_RUN={on}"))[0]
        assert {"--force", "--private", "--dry-run"} <= set(pub.split())
    for bad in ("maybe", "2", "1 0"):
        proc = _make_n("publish", "REPO_ID=a/b", f"FORCE={bad}")
        assert proc.returncode != 0 and f"FORCE='{bad}': expected" in proc.stderr and not _lines(proc)


def test_make_runs_upstream_stages_and_overwrites_only_the_named_one():
    lines = _lines(_make_n("eval", "OVERWRITE=1"))
    assert [x.split()[3] for x in lines] == ["calibrate", "quantize", "eval"]
    assert ["--overwrite" in x for x in lines] == [False, False, True]
    assert [x.split()[3] for x in _lines(_make_n("quantize"))] == ["calibrate", "quantize"]


def test_make_values_with_spaces_are_one_word_or_refused():
    line = _lines(_make_n("calibrate", "MODEL=my models/it's here", "SET=name=x calibration.num_samples=8"))[0]
    assert "--model 'my models/it'\\''s here'" in line and "--set 'name=x' --set 'calibration.num_samples=8'" in line
    proc = _make_n("calibrate", "SET=name=a b")
    assert proc.returncode != 0 and "SET: 'b' is not FIELD=VALUE" in proc.stderr and not _lines(proc)
    assert "--repo-id 'a b/c'" in _lines(_make_n("publish", "REPO_ID=a b/c", "DRY_RUN=1"))[0]
    proc = _make_n("sweep", "SWEEP=../..")
    assert proc.returncode != 0 and "SWEEP='../..': must be one folder name" in proc.stderr and not _lines(proc)


# --- unclear messages --------------------------------------------------------------------------------------------
def _model_variant(proj: Path, name: str, tiny_proxy: Path) -> Path:
    import shutil

    dst = proj / name
    shutil.copytree(tiny_proxy, dst, copy_function=os.link)
    for f in (dst / "LLM").iterdir():  # files this test edits are real copies, not links to the session proxy
        if f.suffix == ".json":
            f.unlink()
            shutil.copy2(tiny_proxy / "LLM" / f.name, f)
    return dst


def test_broken_model_folders_are_named(tmp_path, monkeypatch, capsys, tiny_proxy):
    import shutil

    proj = make_project(tmp_path, monkeypatch)
    trunc = _model_variant(proj, "trunc", tiny_proxy)
    (trunc / "LLM/model.safetensors").unlink()
    with open(tiny_proxy / "LLM/model.safetensors", "rb") as f, open(trunc / "LLM/model.safetensors", "wb") as g:
        g.write(f.read(1 << 20))
    quant = _model_variant(proj, "quant", tiny_proxy)
    cfg = json.loads((quant / "LLM/config.json").read_text())
    (quant / "LLM/config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "compressed-tensors"}}))
    notok = _model_variant(proj, "notok", tiny_proxy)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / "LLM" / f).unlink()
    badcfg = _model_variant(proj, "badcfg", tiny_proxy)
    (badcfg / "LLM/config.json").write_text("{not json")
    before = tree_state(proj)
    for model, needles in (("trunc", ["trunc/LLM/model.safetensors: not a readable safetensors file", "truncated"]),
                           ("quant", ["quant/LLM/config.json: already quantized", "--checkpoint"]),
                           ("notok", ["notok/LLM: no tokenizer files"]),
                           ("badcfg", ["badcfg/LLM/config.json: unreadable"])):
        rc, _, err = cli(capsys, "calibrate", "--model", model, "--out", "cal", *FAST)
        one_line_error(rc, err, *needles)
    assert_only_changed(proj, before)
    shutil.rmtree(trunc)


def test_bad_text_inputs_are_named(tmp_path, monkeypatch, capsys, tiny_proxy):
    from spark_quant.spark.corpus import read_heldout

    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    (proj / "l1.jsonl").write_bytes(b'{"global": [1], "text": "caf\xe9"}\n')
    before = tree_state(proj)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", "--out", "cal", "--set", "calibration.references=l1.jsonl",
                     "--set", "calibration.clone_fraction=1", "--set", "calibration.num_samples=2")
    one_line_error(rc, err, "l1.jsonl: line 1 is not UTF-8")
    with pytest.raises(UserError, match=r"nope.txt: eval.heldout file not found; set eval.heldout"):
        read_heldout(Path("nope.txt"), Path("calibration/texts/train.txt"))
    assert_only_changed(proj, before)


def test_refused_writes_and_bad_ids_are_one_line(tmp_path, monkeypatch, capsys, tiny_proxy):
    import spark_quant.stages.calibrate as cal

    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    before = tree_state(proj)

    def refuse(*a, **k):  # what a read-only folder does (root, which runs the tests, ignores permissions)
        raise PermissionError(13, "Permission denied", "ro/x/.x.tmp-1")

    monkeypatch.setattr(cal, "calibrate", refuse)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", "--out", "ro/x", *FAST)
    one_line_error(rc, err, "ro/x/.x.tmp-1: permission denied; choose another --out")
    with pytest.raises(SystemExit):
        cli(capsys, "proxy", "--out", "p", "--seed", str(2**63))
    assert "is outside 0 <= seed < 2**63" in capsys.readouterr().err
    for repo in ("a/b..c", "a/-b", "a/b.git", "a/" + "x" * 100):
        rc, _, err = cli(capsys, "publish", "--repo-id", repo, "--dry-run")
        one_line_error(rc, err, f"--repo-id {repo!r}")
    assert_only_changed(proj, before)


# --- resources -------------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_folders_of_killed_builds_are_removed_even_when_nothing_is_rebuilt(tmp_path, tiny_proxy):
    import shutil

    from spark_quant.models.proxy import build_proxy

    out = tmp_path / tiny_proxy.name
    shutil.copytree(tiny_proxy, out, copy_function=os.link)
    dead = tmp_path / f".{out.name}.tmp-{_dead_pid()}"
    (dead / "LLM").mkdir(parents=True)
    (dead / "LLM/model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".{out.name}.tmp-{os.getppid()}"  # a running process's build is left alone
    alive.mkdir()
    before = tree_state(out)
    assert build_proxy(out, size="tiny", seed=0) == out
    assert not dead.exists() and alive.exists() and tree_state(out) == before


def test_model_fingerprint_does_not_depend_on_where_the_checkout_lies(tmp_path, monkeypatch, capsys, tiny_proxy):
    import shutil

    from spark_quant.models.folder import model_fingerprint

    proj = make_project(tmp_path, monkeypatch, model=tiny_proxy)
    rc, _, err = cli(capsys, "calibrate", "--model", "model", *FAST)
    assert rc == 0, err
    fp = model_fingerprint(proj / "model")
    assert str(proj) not in json.dumps(fp)
    moved = tmp_path / "moved"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(proj, moved, copy_function=shutil.copy)  # a copy: other paths, other mtimes, same bytes
    shutil.rmtree(proj)
    monkeypatch.chdir(moved)
    before = tree_state(moved)
    rc, out, err = cli(capsys, "calibrate", "--model", "model", *FAST)
    assert rc == 0, err
    assert "is up to date (inputs unchanged); skipping" in out
    assert model_fingerprint(moved / "model") == fp
    assert_only_changed(moved, before)
