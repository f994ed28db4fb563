#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU and TensorRT (issue 19), in under 10 minutes, into ONE report:
#   bash bench/gpu_smoke.sh                 # report: gpu-smoke-<host>-<time>.txt in the repository root
# Stages (each recorded as PASS, FAIL or SKIP with its time and output; a failed stage does not stop the
# ones that do not depend on it):
#   versions           TensorRT (and its CUDA flavour), pycuda, the driver's CUDA version, GPU, compute capability
#   cuda-graph-driver  daemon/cuda_graph.py through libcuda alone (tests/gpu/test_cuda_graph.py): capture, replay
#   parse              tiny bundles (head_dim 64; fp16 and int8) parsed by TensorRT: each layer type, expecting
#                      KV-cache update, rotary, attention and (int8) Q/DQ layers
#   build              compile both engines; layers by precision, quantized GEMMs that did not fuse
#   aliases            every present_* output aliased to its past_* input
#   logits             prefill slots 0 and 1, decode batch 1 by plain enqueue, each against ONNX Runtime (CPU)
#   graph-replay       capture each decode batch size's CUDA graph; replay == plain enqueue
#   pytest-gpu         `pytest -m gpu tests/gpu` in a subprocess: its exit code catches a pycuda abort at exit
#   throughput         the demo model's decode tokens/s at fp16, fp8 (cc >= 8.9) and int8 vs the bandwidth roofline
# Environment: PYTHON (default: .venv/bin/python, else python3), EDGELLM_SMOKE_REPORT (report path),
# EDGELLM_SMOKE_WORK (bundles; default a temporary folder), EDGELLM_DEMO_WHEEL_DIR (the demo model offline).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
REPORT=${EDGELLM_SMOKE_REPORT:-$REPO/gpu-smoke-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).txt}
WORK=${EDGELLM_SMOKE_WORK:-$(mktemp -d -t edgellm-gpu-smoke-XXXXXX)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"
: > "$REPORT"
START=$(date +%s)
declare -A RESULT=()
ORDER=()

log() { printf '%s\n' "$*" | tee -a "$REPORT"; }

# stage NAME LIMIT_S COMMAND...: run one stage with a time limit; exit 0 PASS, 3 SKIP, anything else FAIL.
stage() {
    local name=$1 limit=$2 rc=0 t0 out
    shift 2
    ORDER+=("$name")
    t0=$(date +%s)
    out=$(mktemp)
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1 || rc=$?
    case $rc in
        0) RESULT[$name]=PASS ;;
        3) RESULT[$name]=SKIP ;;
        124|137) RESULT[$name]="FAIL (over ${limit} s)" ;;
        134) RESULT[$name]="FAIL (SIGABRT: a pycuda context left pushed?)" ;;
        *) RESULT[$name]="FAIL (exit $rc)" ;;
    esac
    log "[$name] ${RESULT[$name]} in $(( $(date +%s) - t0 )) s"
    sed 's/^/    /' "$out" | tail -n 60 | tee -a "$REPORT"
    rm -f "$out"
}

# needs NAME DEPENDENCY: skip a stage whose input a failed stage should have made.
needs() {
    [[ "${RESULT[$2]:-}" == PASS ]] && return 0
    ORDER+=("$1")
    RESULT[$1]=SKIP
    log "[$1] SKIP: needs stage $2 (${RESULT[$2]:-not run})"
    return 1
}

log "edgellm GPU smoke test, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
log "python: $PYTHON; work folder: $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    2>&1 | sed 's/^/nvidia-smi: /' | tee -a "$REPORT" || true

stage versions 60 "$PYTHON" bench/gpu_smoke.py versions "$WORK"
# pytest exits 5 when it collects nothing; every test skipped (no libcuda) counts as SKIP through -rs below.
cuda_graph_driver() {
    local out rc=0
    out=$("$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/gpu/test_cuda_graph.py 2>&1) || rc=$?
    printf '%s\n' "$out"
    if [[ $rc -eq 0 ]] && grep -q " passed" <<<"$out"; then return 0; fi
    if [[ $rc -eq 0 || $rc -eq 5 ]]; then return 3; fi
    return 1
}
stage cuda-graph-driver 120 bash -c "$(declare -f cuda_graph_driver); PYTHON='$PYTHON' cuda_graph_driver"
stage parse 150 "$PYTHON" bench/gpu_smoke.py parse "$WORK"
if needs build parse; then stage build 240 "$PYTHON" bench/gpu_smoke.py build "$WORK"; fi
if needs aliases build; then stage aliases 60 "$PYTHON" bench/gpu_smoke.py aliases "$WORK"; fi
if needs logits build; then stage logits 90 "$PYTHON" bench/gpu_smoke.py logits "$WORK"; fi
if needs graph-replay build; then stage graph-replay 90 "$PYTHON" bench/gpu_smoke.py graph-replay "$WORK"; fi
pytest_gpu() {
    "$PYTHON" -c "from build_engine.trt_compiler import tensorrt_available as t; import sys; m = t(); print(m or ''); sys.exit(3 if m else 0)" || return $?
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu
}
stage pytest-gpu 300 bash -c "$(declare -f pytest_gpu); PYTHON='$PYTHON' pytest_gpu"
# Whatever time is left (the whole run stays under 10 minutes), at most 6 minutes.
LEFT=$(( 570 - ($(date +%s) - START) ))
if (( LEFT > 60 )); then
    EDGELLM_SMOKE_THROUGHPUT_S=$(( LEFT - 60 )) stage throughput "$LEFT" "$PYTHON" bench/gpu_smoke.py throughput "$WORK"
else
    ORDER+=(throughput); RESULT[throughput]=SKIP; log "[throughput] SKIP: out of time"
fi

log ""
log "summary ($(( $(date +%s) - START )) s):"
FAILED=0
for name in "${ORDER[@]}"; do
    log "  $name: ${RESULT[$name]}"
    [[ "${RESULT[$name]}" == FAIL* ]] && FAILED=1
done
# PASS needs every TensorRT stage to have run: skipping them means this machine could not check the GPU path.
for name in versions parse build aliases logits graph-replay pytest-gpu; do
    [[ "${RESULT[$name]:-}" == PASS ]] || FAILED=1
done
if (( FAILED )); then log "RESULT: FAIL"; else log "RESULT: PASS"; fi
log "report: $REPORT"
exit "$FAILED"
