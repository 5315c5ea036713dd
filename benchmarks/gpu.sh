#!/usr/bin/env bash
# kfax against SGD and Adam on one GPU: ResNet-50 (batch 128, 224x224, width 64) and the
# lm1b-sized transformer LM (32 x 256 tokens, width 512, depth 6, vocabulary 30000), each in
# float32 and bfloat16, in at most GPU_SH_BUDGET seconds (default 290, compiles included).
#
#   bash benchmarks/gpu.sh            # on the GPU: writes benchmarks/results/gpu*
#   bash benchmarks/gpu.sh --smoke    # (or GPU_SH_SMOKE=1) the same pipeline at tiny sizes on
#                                     # CPU, into a temporary directory, to check the script
#
# Each model and dtype is one `step_time.py` process (SGD, Adam, kfax factored and eigen as
# listed in RUNS, no kfac-jax), under `timeout`: its limit is its cap below, cut so that every
# later run keeps RESERVE seconds of the budget. A run that times out or fails is listed as such
# in the table; the others still count. Results: gpu_step_time_<model>_<dtype>.json, the run log
# gpu_runs.txt (model, dtype, exit status, seconds), the full output gpu_log.txt and the table
# gpu.md (benchmarks/gpu_table.py), all in GPU_SH_OUT (default benchmarks/results).
#
# Environment: PYTHON (default python), GPU_SH_BUDGET, GPU_SH_OUT, GPU_SH_COMPILE_THREADS
# (default 5: the steps after SGD's compile at once; 1 compiles one by one). Compiled
# executables are cached in JAX_COMPILATION_CACHE_DIR (default /tmp/kfax_gpu_jax_cache), so a
# rerun on the same machine skips the compiles. Nothing is downloaded: kfax is installed with
# `pip install -e . --no-deps --no-build-isolation` only if it does not import.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=${GPU_SH_SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
THREADS=${GPU_SH_COMPILE_THREADS:-5}
RESERVE=30

if [[ "$SMOKE" == 1 ]]; then
  OUT=${GPU_SH_OUT:-$(mktemp -d /tmp/kfax_gpu_smoke.XXXXXX)}
  BUDGET=${GPU_SH_BUDGET:-900}
  THREADS=${GPU_SH_COMPILE_THREADS:-2}
  # model dtype kfax-modes cap-seconds: tiny sizes, ResNet-50 in factored mode only (CPU compiles)
  RUNS=("resnet50 float32 factored 300" "transformer float32 factored,eigen 200"
        "transformer bfloat16 factored,eigen 200" "resnet50 bfloat16 factored 300")
  SIZE=(--size cpu)
  RESNET=(--batch 2 --image_size 32 --width 8 --steps 2 --warmup 1 --check_steps 0)
  LM=(--batch 4 --seq_len 16 --width 32 --depth 1 --heads 2 --classes 64 --steps 2 --warmup 1
      --check_steps 10)
else
  OUT=${GPU_SH_OUT:-benchmarks/results}
  BUDGET=${GPU_SH_BUDGET:-290}
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/kfax_gpu_jax_cache}
  # model dtype kfax-modes cap-seconds, in order of importance (the README's GPU target first)
  RUNS=("resnet50 float32 factored,eigen 150" "transformer float32 factored,eigen 60"
        "transformer bfloat16 factored,eigen 50" "resnet50 bfloat16 factored 120")
  SIZE=(--size gpu)
  # ResNet-50's 100-step cycle would take ~20 s a mode: skipped; the LM's is a few seconds.
  RESNET=(--steps 5 --warmup 2 --check_steps 0)
  LM=(--steps 10 --warmup 2 --check_steps 100)
fi
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

if ! "$PY" -c 'import kfax' 2>/dev/null; then
  echo "kfax does not import: pip install -e . --no-deps --no-build-isolation"
  "$PY" -m pip install -q -e . --no-deps --no-build-isolation || exit 1
fi
PLATFORM=$("$PY" -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)') || exit 1
echo "device: $PLATFORM; output in $OUT; budget ${BUDGET} s; smoke=$SMOKE"
if [[ "$SMOKE" != 1 && ! "$PLATFORM" =~ ^(gpu|cuda|rocm) ]]; then
  echo "no GPU (jax.devices()[0] is $PLATFORM): not writing GPU results; use --smoke on CPU"
  exit 1
fi

: > "$OUT/gpu_runs.txt"
: > "$OUT/gpu_log.txt"
for ((k = 0; k < ${#RUNS[@]}; k++)); do
  read -r model dtype modes cap <<< "${RUNS[k]}"
  json="$OUT/gpu_step_time_${model}_${dtype}.json"
  rm -f "$json"
  later=$((${#RUNS[@]} - k - 1))
  limit=$((DEADLINE - $(date +%s) - RESERVE * later))
  ((limit > cap)) && limit=$cap
  if ((limit < 20)); then
    echo "$model $dtype: not run, the budget is spent" | tee -a "$OUT/gpu_log.txt"
    echo "$model $dtype 200 0" >> "$OUT/gpu_runs.txt"  # gpu_table.NOT_RUN
    continue
  fi
  if [[ "$model" == resnet50 ]]; then flags=("${RESNET[@]}"); else flags=("${LM[@]}"); fi
  echo "=== $model $dtype (kfax $modes), at most $limit s" | tee -a "$OUT/gpu_log.txt"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$PY" benchmarks/step_time.py --models "$model" \
    --dtype "$dtype" "${SIZE[@]}" "${flags[@]}" --damping_modes "$modes" --no_kfac_jax \
    --compile_threads "$THREADS" --cost_model_flops sgd_step --out "$json" 2>&1 \
    | tee -a "$OUT/gpu_log.txt"
  status=${PIPESTATUS[0]}
  echo "$model $dtype $status $(($(date +%s) - t0))" >> "$OUT/gpu_runs.txt"
  ((status == 0)) || echo "$model $dtype: exit status $status" | tee -a "$OUT/gpu_log.txt"
done

if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD -- kfax benchmarks/*.py || COMMIT="$COMMIT+changes"
else
  COMMIT=unknown
fi
"$PY" benchmarks/gpu_table.py --dir "$OUT" --commit "$COMMIT"
echo "gpu.sh: $(($(date +%s) - START)) s in all; table in $OUT/gpu.md"
