"""The measurements' own outputs: the ones that write as they go (a paired speed run, eval/gpu_audio.py,
eval/gpu_speed.py) only ever fill a folder they claim and keep what a run cut off had measured; the ones that
write one result file (audio.bench, audio.speaker, serving_profile_timing) write it whole. None replaces
anything it did not make, whatever flag is passed, and each refuses before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from safety_helpers import tree_state

from spark_quant.artifacts import read_manifest
from spark_quant.errors import UserError
from spark_quant.outputs import LIVE_MARK, check_result_file, live_folder, write_result_file

FAKE = "tests.fixtures.fake_session"  # stand-in engine sessions (no vLLM)


def test_a_live_folder_is_marked_while_filled_and_gets_its_manifest_when_the_run_ends(tmp_path):
    out = tmp_path / "run"
    with live_folder(out, "paired", False, {"argv": ["x"]}):
        assert json.loads((out / LIVE_MARK).read_text())["stage"] == "paired"
        (out / "paired.json").write_text("{}")
    assert not (out / LIVE_MARK).exists()
    m = read_manifest(out)
    assert m["stage"] == "paired" and m["config"] == {"argv": ["x"]} and "paired.json" in m["files"]


def test_a_run_cut_off_keeps_its_partial_results_and_its_folder_is_never_reused_or_replaced(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), live_folder(out, "paired", False, {}):
        (out / "paired.json").write_text('{"cells": {"b1": 1}}')
        raise RuntimeError("the machine went back")
    assert (out / LIVE_MARK).is_file() and (out / "paired.json").read_text() == '{"cells": {"b1": 1}}'
    before = tree_state(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds a paired run that did not finish .* partial results are kept"), \
                live_folder(out, "paired", overwrite, {}):
            pass
    assert tree_state(out) == before


def test_a_finished_run_is_replaced_whole_only_with_overwrite(tmp_path):
    out = tmp_path / "run"
    with live_folder(out, "paired", False, {}):
        (out / "old-only.json").write_text("1")
    with pytest.raises(UserError, match="already exists; pass --overwrite"), live_folder(out, "paired", False, {}):
        pass
    with live_folder(out, "paired", True, {}):
        (out / "paired.json").write_text("2")
    assert not (out / "old-only.json").exists()  # old and new results never mix
    with pytest.raises(UserError, match="is a 'paired' folder, not a finished gpu_audio folder"), \
            live_folder(out, "gpu_audio", True, {}):
        pass


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_paired_refuses_a_folder_it_did_not_make_before_any_work(tmp_path, tiny_proxy, overwrite):
    from spark_quant.stages import paired

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "paired.json").write_text("my own notes")
    before = tree_state(tmp_path)
    with pytest.raises(UserError, match=r"results: exists and is not a folder spark-quant made.*whatever flag"):
        paired.main(["--out", str(mine), "--variant", f"a={tiny_proxy / 'LLM'}", "--cell", "b1=1:20:a",
                     "--session-module", FAKE, "--python", sys.executable, *overwrite])
    with pytest.raises(UserError, match="is inside an input of paired"):
        paired.main(["--out", str(tiny_proxy / "LLM" / "run"), "--variant", f"a={tiny_proxy / 'LLM'}"])
    assert tree_state(tmp_path) == before


def test_paired_run_ends_with_a_manifest_and_a_rerun_needs_overwrite(tmp_path, tiny_proxy):
    from spark_quant.stages import paired

    out, llm = tmp_path / "run", tiny_proxy / "LLM"
    args = ["--out", str(out), "--experiment", str(ROOT / "experiments/spark-tts_w8a8_int8.yaml"),
            "--variant", f'a={llm}::{{"fake_s_per_token": 1e-4}}', "--cell", "b1=1:10:a", "--trials", "3",
            "--session-module", FAKE, "--python", sys.executable]
    assert paired.main(args) == 0
    assert read_manifest(out)["stage"] == "paired" and not (out / LIVE_MARK).exists()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        paired.main(args)
    assert paired.main([*args, "--overwrite"]) == 0


def test_gpu_audio_refuses_a_folder_it_did_not_make_whatever_flag_is_passed(tmp_path):
    mine = tmp_path / "audio"
    mine.mkdir()
    (mine / "audio.json").write_text("a user's file")
    before = tree_state(tmp_path)
    for extra in ([], ["--overwrite"]):
        p = subprocess.run([sys.executable, "eval/gpu_audio.py", "--out", str(mine), "--model", "bf16=nowhere",
                            *extra], cwd=ROOT, text=True, capture_output=True, timeout=300, check=False)
        assert p.returncode != 0
        assert "gpu_audio: " in p.stderr and "not a folder spark-quant made" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert tree_state(tmp_path) == before


def test_gpu_speed_refuses_a_folder_it_did_not_make_and_the_scripts_never_write_into_a_model(tmp_path):
    mine = tmp_path / "speed"
    mine.mkdir()
    (mine / "speed.md").write_text("a user's notes")
    before = tree_state(tmp_path)
    p = subprocess.run([sys.executable, "eval/gpu_speed.py", "--out", str(mine), "--model", "bf16=nowhere",
                        "--overwrite"], cwd=ROOT, text=True, capture_output=True, timeout=300, check=False)
    assert p.returncode != 0 and "gpu_speed: " in p.stderr and "not a folder spark-quant made" in p.stderr, p.stderr
    assert tree_state(tmp_path) == before
    model = tmp_path / "model"
    (model / "LLM").mkdir(parents=True)
    for script in ("eval/gpu_speed.py", "eval/gpu_audio.py"):
        args = ["--out", str(model / "LLM" / "run"), "--model", f"m={model / 'LLM'}"]
        p = subprocess.run([sys.executable, script, *args], cwd=ROOT,
                           text=True, capture_output=True, timeout=300, check=False)
        assert p.returncode != 0 and "is inside an input of" in p.stderr, p.stderr
    assert not (model / "LLM" / "run").exists()


def test_a_result_file_is_written_whole_and_replaces_only_its_own_tools_earlier_result(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    write_result_file(out, {"rows": [1]}, "audio.bench", overwrite=False)
    assert json.loads(out.read_text()) == {"made_by": "audio.bench", "rows": [1]}
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left
    with pytest.raises(UserError, match="bench.json: already exists; pass --overwrite"):
        check_result_file(out, "audio.bench", overwrite=False)
    write_result_file(out, {"rows": [2]}, "audio.bench", overwrite=True)
    assert json.loads(out.read_text())["rows"] == [2]
    for text in ("my notes", '{"rows": [1]}', '{"made_by": "audio.speaker"}', "[1, 2]"):
        other = tmp_path / "other.json"
        other.write_text(text)
        with pytest.raises(UserError, match="other.json: exists and is not a result audio.bench wrote; refusing"):
            write_result_file(other, {"rows": [3]}, "audio.bench", overwrite=True)
        assert other.read_text() == text
    with pytest.raises(UserError, match="is not a result"):
        check_result_file(tmp_path / "sub", "audio.bench", overwrite=True)  # a folder


def test_result_file_tools_refuse_a_users_file_before_any_work_with_one_line(tmp_path):
    from spark_quant.audio import speaker
    from spark_quant.stages import serving_profile_timing

    mine = tmp_path / "notes.json"
    mine.write_text("a user's file")
    before = tree_state(tmp_path)
    with pytest.raises(UserError, match="notes.json: exists and is not a result audio.speaker wrote"):
        speaker.main(["--bench", "1", "--out", str(mine), "--overwrite"])
    with pytest.raises(UserError, match="notes.json: exists and is not a result serving_profile_timing wrote"):
        serving_profile_timing.main(["--model", str(tmp_path / "nowhere"), "--out", str(mine)])
    p = subprocess.run([sys.executable, "-m", "spark_quant.audio.bench", "--device", "cpu", "--out", str(mine),
                        "--overwrite"], cwd=ROOT, text=True, capture_output=True, timeout=300, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {mine}: exists and is not a result audio.bench")
    assert tree_state(tmp_path) == before


def test_a_variant_that_never_starts_makes_the_run_exit_nonzero_and_keeps_the_others_cells(tmp_path, tiny_proxy,
                                                                                             capsys):
    from spark_quant.stages import paired

    out, llm = tmp_path / "run", tiny_proxy / "LLM"
    rc = paired.main(["--out", str(out), "--experiment", str(ROOT / "experiments/spark-tts_w8a8_int8.yaml"),
                      "--variant", f'a={llm}::{{"fake_s_per_token": 1e-4}}',
                      "--variant", f'b={llm}::{{"fake_fail_start": true}}',
                      "--cell", "b1=1:10:a,b", "--trials", "3", "--session-module", FAKE, "--python", sys.executable])
    assert rc == 1 and "paired: not every variant ran: b failed to start" in capsys.readouterr().err
    res = json.loads((out / "paired.json").read_text())
    assert res["status"] == "done" and "b" in res["failed_variants"] and res["cells"]["b1"]["labels"] == ["a"]
    assert read_manifest(out)["stage"] == "paired"  # the run ended: its folder is finished, not left as cut off
