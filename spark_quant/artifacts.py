"""Stage folders' manifests and file hashes (``outputs.py`` says where and how a stage writes).

The manifest, written last, holds the stage's resolved config, a fingerprint of its inputs
(a stage whose fingerprint did not change is skipped), library versions, the
device, the git commit, timings and the sha256 of every file in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from spark_quant.envinfo import device_info, git_commit, now, versions
from spark_quant.errors import UserError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_cache_path() -> Path:
    """Where file digests are remembered: ``build/cache/sha256.json`` of the project (the working directory,
    like every stage folder), or ``$SPARK_QUANT_DIGEST_CACHE``."""
    return Path(os.environ.get("SPARK_QUANT_DIGEST_CACHE") or "build/cache/sha256.json")


def sha256_cached(path: Path) -> str:
    """sha256 of a file, remembered by (absolute path, size, mtime_ns): a 2 GB model is hashed once, not at
    every stage. A changed file (other size or mtime) is hashed again; a lost or broken cache only costs time."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    cache_file = digest_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return hit[2]
    digest = sha256_file(path)
    if not isinstance(cache, dict):
        cache = {}
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        part = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.part")
        part.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(part, cache_file)  # concurrent runs may drop each other's entries, never corrupt the file
    except OSError:
        pass
    return digest


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


