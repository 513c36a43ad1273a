"""Shared by the tests/test_safety_*.py files: a throwaway project tree, the CLI run in-process, and a hash of
the whole tree before and after, so a test can assert that nothing outside the stage's own folder changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import ROOT

from spark_quant.artifacts import sha256_file
from spark_quant.cli import main


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` (folders, links and the sha256 of every file)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = sha256_file(p)
    return out


def changed_paths(root: Path, before: dict[str, str]) -> set[str]:
    after = tree_state(root)
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def assert_only_changed(root: Path, before: dict[str, str], *allowed: str) -> set[str]:
    """Assert that every path that changed under ``root`` lies in one of ``allowed`` (folders relative to root)."""
    changed = changed_paths(root, before)
    outside = sorted(k for k in changed if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed))
    assert not outside, f"changed outside {allowed or 'nothing'}: {outside[:10]}"
    return changed


def make_project(tmp_path: Path, monkeypatch, model: Path | None = None) -> Path:
    """A copy of the repo's inputs (texts, experiments, recipes, docs, README) as the working directory; with
    ``model``, a hard-linked copy of it at ``model/`` inside. Digests are cached outside the tree."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("calibration/texts", "experiments", "recipes", "docs"):
        shutil.copytree(ROOT / name, proj / name)
    shutil.copy2(ROOT / "README.md", proj / "README.md")
    if model is not None:
        shutil.copytree(model, proj / "model", copy_function=os.link)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("SPARK_QUANT_DIGEST_CACHE", str(tmp_path / "digests.json"))
    return proj


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``spark-quant ARGS`` in-process: (exit code, stdout, the last stderr line)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = [x for x in err.strip().splitlines() if x.strip() and "WARNING - No accelerator" not in x]
    return rc, out, lines[-1] if lines else ""


def one_line_error(rc: int, err: str, *needles: str, code: int = 2) -> None:
    assert rc == code, err
    assert err.startswith("spark-quant: error: ") and "internal error" not in err, err
    for n in needles:
        assert n in err, err


FAST = ("--set", "calibration.num_samples=4", "--set", "calibration.clone_fraction=0")
