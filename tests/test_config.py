"""Experiment YAML: shipped files load, bad input gets a one-line error naming file and field."""

from pathlib import Path

import pytest

from spark_quant.cli import main
from spark_quant.config import Experiment, load_experiment
from spark_quant.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    exp = load_experiment(path)
    assert exp.name == path.stem
    assert (ROOT / exp.recipe).is_file()


def test_defaults_and_derived_folders():
    exp = load_experiment(None)
    assert exp.calibration.num_samples == 512 and exp.calibration.clone_fraction == 0.5
    assert exp.eval.baseline_dtype == "bfloat16"
    assert exp.checkpoint_dir == Path("checkpoints") / exp.name


def test_command_line_beats_yaml(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("calibration:\n  num_samples: 100\n")
    exp = load_experiment(f, ["calibration.num_samples=7", "eval.concurrency=[4,1,4]"])
    assert exp.calibration.num_samples == 7
    assert exp.eval.concurrency == [1, 4]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("calibration:\n  num_samples: 0\n", "calibration.num_samples: Input should be greater than 0"),
        ("calibration:\n  clone_fraction: 1.5\n", "calibration.clone_fraction: Input should be less than or equal to 1"),
        ("calibration:\n  num_sample: 5\n", "calibration.num_sample: unknown field"),
        ("eval:\n  baseline_dtype: int4\n", "eval.baseline_dtype: Input should be"),
        ("eval:\n  max_new_tokens: 5000\n", "leaves no room for the prompt"),
        ("calibration: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("calibration:\n  seed: abc\n", "calibration.seed: Input should be a valid integer"),
    ],
)
def test_bad_experiment_is_one_line_naming_file_and_field(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_experiment(f)
    msg = str(e.value)
    assert msg.startswith(str(f)) and needle in msg and "\n" not in msg


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("calibration:\n  num_samples: -3\n")
    rc = main(["calibrate", "-e", str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "calibration.num_samples" in err and "Traceback" not in err


def test_missing_model_folder_is_named(tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tmp_path / "nope"), "--set", "calibration.num_samples=2"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "nope") in err and "model folder not found" in err


def test_field_descriptions_exist_for_every_field():
    from spark_quant.config import describe_fields

    rows = describe_fields(Experiment)
    assert len(rows) > 20
    assert all(desc for name, _, desc in rows if name.split(".")[0] in ("calibration",) and name != "calibration.seed")


def test_git_commit_prefers_the_commit_a_copied_tree_names(monkeypatch):
    import subprocess

    from spark_quant.envinfo import REPO_ROOT, git_commit

    monkeypatch.delenv("SPARK_QUANT_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: HEAD, marked when tracked files are changed
        assert git_commit().removesuffix("-dirty") == head.stdout.strip()
    # a tree copied to a GPU machine keeps a stale .git (or none): the commit it was copied at wins
    monkeypatch.setenv("SPARK_QUANT_COMMIT", "0123abcd" * 5)
    assert git_commit() == "0123abcd" * 5
