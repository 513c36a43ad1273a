"""Where a stage may write, and how: ownership, atomic folders, and the one stage preamble.

Every stage writes into a temporary sibling folder (``.NAME.tmp-PID``) and renames it into place when it
has finished, ``manifest.json`` last. So a folder with a manifest is complete, a folder without one does
not exist under the final name, and a run killed at any point leaves the previous good artifact; the
temporary folders of dead processes are removed by the next run.

A stage only ever replaces a folder it made: a finished folder of the same stage (its manifest says so)
or an empty one. Anything else at ``out`` (a source model, the corpus, ``docs/``, a file) is refused with
one line, ``--overwrite`` or not; and no output may be, contain or lie inside one of the stage's inputs.

Measurements that write their results as they go (a paired speed run, the streamed-audio bench: a machine
taken back mid-run must leave what was measured) use ``live_folder`` instead: the same refusals, a marker
while the folder is filled, the manifest when it ends, and a folder cut off mid-run is kept as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from spark_quant.artifacts import MANIFEST, fingerprint, link_or_copy, read_manifest, verify_files
from spark_quant.envinfo import now
from spark_quant.errors import UserError

TMP_TAG = ".tmp-"
LIVE_MARK = ".spark-quant-live"  # a live-written folder being filled, or cut off while it was


def is_owned(folder: Path, stage: str) -> bool:
    """A finished folder of ``stage`` (its manifest says so): the only kind a stage may replace."""
    try:
        m = read_manifest(folder)
    except UserError:
        return False
    return bool(m) and m.get("stage") == stage


def check_not_a_source(out: Path, sources: list[Path], stage: str) -> None:
    """No output is, contains or lies inside one of the stage's inputs (model, corpus, references, recipe...)."""
    o = Path(out).resolve()
    for src in sources:
        if src is None:
            continue
        s = Path(src).resolve()
        if o == s or o in s.parents or s in o.parents:
            raise UserError(f"{out}: is {'inside ' if s in o.parents else ''}an input of {stage} ({src}); "
                            "an output can never be an input: choose another --out")


def check_writable(out: Path, overwrite: bool, stage: str, replace_stale: bool = False) -> None:
    """Refuse an existing ``out`` before any work is done.

    Only a finished folder of the same stage is ever replaced: with ``overwrite``, or when it is the
    pipeline's own folder (``replace_stale``) and its inputs changed. An empty folder is used as it is.
    Anything else is refused whatever the flags.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and (out / LIVE_MARK).is_file():
        raise UserError(f"{out}: holds a {stage_of_live(out)} run that did not finish (cut off, or it failed); its "
                        "partial results are kept as they are (whatever flag is passed): choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder spark-quant made; refusing to replace it "
                        "(whatever flag is passed): choose another --out")
    if not any(out.iterdir()):
        return
    if not is_owned(out, stage):
        try:
            other = (read_manifest(out) or {}).get("stage")
        except UserError:
            other = None
        what = f"a {other!r} folder" if other else "not a folder spark-quant made"
        raise UserError(f"{out}: exists and is {what}, not a finished {stage} folder; refusing to replace it "
                        "(whatever flag is passed): choose another --out")
    if not (overwrite or replace_stale):
        raise UserError(f"{out}: output folder already exists; pass --overwrite to replace it or choose another --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def remove_dead_temporaries(out: Path) -> None:
    """Temporary build folders of ``out`` left by processes that no longer run (kill -9, power loss)."""
    for stale in Path(out).parent.glob(f".{Path(out).name}{TMP_TAG}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path, already_done: Callable[[Path], bool] | None = None) -> Path:
    """Move a finished ``tmp`` folder to ``out``, replacing what is there, never leaving ``out`` half-built.

    ``already_done(out)`` is asked when the rename fails: another process may have finished the same
    build first (then its result is kept). Otherwise the previous ``out`` is put back and the error raised.
    """
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if already_done is not None and already_done(out):
            return out
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_folder(out: Path, marker: str, already_done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; when the block ends with ``marker`` written in it, it replaces
    ``out`` atomically. On any error (or a missing marker) it is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"the build wrote no {marker} into {tmp}")
        swap_into_place(tmp, out, already_done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def stage_folder(out: Path, overwrite: bool, stage: str, replace_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success (its manifest written) it replaces ``out`` atomically.
    ``out`` is checked first (``check_writable``)."""
    check_writable(out, overwrite, stage, replace_stale)
    with atomic_folder(out, MANIFEST) as tmp:
        yield tmp


def stage_of_live(out: Path) -> str:
    """The stage named in a live folder's marker ("spark-quant" when the marker cannot be read)."""
    import json

    try:
        return json.loads((Path(out) / LIVE_MARK).read_text()).get("stage") or "spark-quant"
    except (OSError, ValueError, AttributeError):
        return "spark-quant"


@contextlib.contextmanager
def live_folder(out: Path, stage: str, overwrite: bool, config: dict[str, Any]) -> Iterator[Path]:
    """A folder that a measurement fills as it goes, so that a run cut off keeps what it measured.

    ``out`` is refused as ``check_writable`` refuses it (only a finished folder of ``stage`` is replaced, and
    only with ``overwrite``: it is removed first, so old and new results never mix), and so is a folder left
    unfinished by an earlier run. While the block runs the folder carries ``LIVE_MARK``; when it ends without
    an exception the manifest is written and the marker removed. After an exception (or a kill) the marker
    stays: the folder and its partial results are never reused or replaced.
    """
    import json
    import time

    from spark_quant.artifacts import write_manifest

    out = Path(out)
    check_writable(out, overwrite, stage)
    if out.is_dir() and any(out.iterdir()):  # a finished folder of this stage, and --overwrite
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (out / LIVE_MARK).write_text(json.dumps({"stage": stage, "pid": os.getpid(), "created": now()}) + "\n")
    yield out
    (out / LIVE_MARK).unlink()
    write_manifest(out, stage, config, inputs={}, started=started)


RESULT_KEY = "made_by"  # the key that marks a result file as one a spark-quant tool wrote


def check_result_file(path: Path, tool: str, overwrite: bool) -> None:
    """A measurement's one JSON result file (``--out FILE``) may go to ``path``: nothing there, or ``tool``'s own
    earlier result (its ``made_by`` key) and ``overwrite``. Anything else is refused with one line, before any
    work, whatever flag is passed."""
    import json

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        mine = not path.is_symlink() and path.is_file() and json.loads(path.read_text()).get(RESULT_KEY) == tool
    except (OSError, ValueError, AttributeError):
        mine = False
    if not mine:
        raise UserError(f"{path}: exists and is not a result {tool} wrote; refusing to replace it (whatever flag is "
                        "passed): choose another --out")
    if not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it or choose another --out")


def write_result_file(path: Path, doc: dict[str, Any], tool: str, overwrite: bool) -> Path:
    """Write ``doc`` (with ``made_by: tool``) to ``path`` whole: a temporary sibling, then renamed into place."""
    import json

    check_result_file(path, tool, overwrite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
    try:
        tmp.write_text(json.dumps({RESULT_KEY: tool, **doc}, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def reuse_equivalent(out: Path, stage: str, inputs_fingerprint: str, overwrite: bool = False,
                     replace_stale: bool = False, updates: dict[str, Any] | None = None) -> Path | None:
    """Fill ``out`` from a sibling folder of the same stage made from the same inputs (by hash).

    Experiments that differ only downstream (another recipe, other eval settings) share their
    calibration; recipes that differ only in their eval share their checkpoint. The sibling's
    files are verified against its manifest and hard-linked (no extra space); the new manifest
    records ``reused_from`` (plus ``updates``). Returns the sibling used, or None when there is none.
    """
    import json

    out = Path(out)
    if not out.parent.is_dir():
        return None
    for cand in sorted(out.parent.glob(f"*/{MANIFEST}")):
        folder = cand.parent
        if folder.resolve() == out.resolve() or folder.name.startswith("."):
            continue
        try:
            m = read_manifest(folder)
        except UserError:
            continue
        if not m or m.get("stage") != stage or m.get("inputs_fingerprint") != inputs_fingerprint:
            continue
        try:
            verify_files(folder, m)
        except UserError:
            continue
        with stage_folder(out, overwrite=overwrite, stage=stage, replace_stale=replace_stale) as tmp:
            for item in sorted(folder.iterdir()):
                if item.name != MANIFEST:
                    link_or_copy(item, tmp / item.name)
            manifest = {**m, **(updates or {}), "reused_from": str(folder), "created": now()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return folder
    return None


def begin_stage(out: Path, stage: str, inputs: Any, overwrite: bool, derived: bool, sources: list[Path] = (),
                reuse: bool = False, updates: dict[str, Any] | None = None, why: str = "inputs unchanged") -> str | None:
    """The one stage preamble, before any work: ``out`` may be written (never a source, never a folder the
    tool did not make); then ``"skip"`` if it already holds this stage's result for ``inputs`` (files
    verified), ``"reused"`` if a sibling made from the same inputs was linked in (``reuse``, pipeline
    folders only), else None: the caller does the work and writes ``out`` with ``stage_folder``."""
    out = Path(out)
    check_not_a_source(out, list(sources), stage)
    remove_dead_temporaries(out)  # also when the stage is skipped: a kill -9 leaves no folder behind for good
    fp = fingerprint(inputs)
    if not overwrite and is_owned(out, stage) and read_manifest(out).get("inputs_fingerprint") == fp:
        verify_files(out)
        print(f"{stage}: {out} is up to date ({why}); skipping")
        return "skip"
    check_writable(out, overwrite, stage, replace_stale=derived)
    if reuse and derived and (src := reuse_equivalent(out, stage, fp, overwrite, replace_stale=True, updates=updates)):
        print(f"{stage}: {out} reuses {src} (made from the same inputs)")
        return "reused"
    return None
