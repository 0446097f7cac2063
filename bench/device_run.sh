#!/usr/bin/env bash
# The full-size benchmarks on a lent GPU (an H200 here), as one prepared call of the device tool: each step
# under its own time limit, its output written to $OUT as it goes, a summary of the steps last.
#   bash bench/device_wheels.sh                    # first, on the CPU machine (the wheels travel in .whl/)
#   run: bash bench/device_run.sh infer            # carry [".whl"], timeout_s 600; then, one call each:
#   run: bash bench/device_run.sh serve            # (the lease's 15 minutes hold about two of them)
#   run: bash bench/device_run.sh train
# Steps: infer (bench_infer: decode tok/s at batch 1 and 8, TTFT at 30 s, the 10-minute prefill, bf16
# and int8, transformers beside them), serve (bench_serve: 32 clients against the generate loop), train
# (bench_train with 4 decoder layers, each stage's trainable set). SIZE=tiny runs them at the CPU's size.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
SIZE=${SIZE:-full}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; python3 -c \
  "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, jax.devices())"; } | tee "$OUT/00-machine.txt"

summary=()
step() {  # step NAME SECONDS COMMAND...: one benchmark under a time limit, its output in $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local code=$?
  summary+=("$name: exit $code after $((SECONDS - start)) s (limit $limit)")
  tail -n 25 "$OUT/$name.txt"
}
if [ "$SIZE" = full ]; then
  INFER=(--audio 30s --audio 10min --batch 1 --batch 8 --batch-10min 1 --new-tokens 64 --repeats 3)
  SERVE=(--clients 1 --clients 32 --requests 2); TRAIN=(--decoder-layers 4)
else  # a check of the script itself, in seconds
  INFER=(--audio 30s --batch 1 --new-tokens 4 --repeats 1)
  SERVE=(--clients 2 --requests 1 --new-tokens 4 --max-slots 4); TRAIN=(--steps 1)
fi
for s in "$@"; do
  case $s in
    infer) step infer 330 python3 bench/bench_infer.py --size "$SIZE" --quantize none --quantize int8 "${INFER[@]}" ;;
    serve) step serve 500 python3 bench/bench_serve.py --size "$SIZE" "${SERVE[@]}" ;;
    train) step train 500 python3 bench/bench_train.py --size "$SIZE" "${TRAIN[@]}" ;;
    *) echo "error: unknown step $s (infer, serve, train)" >&2; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}" | tee "$OUT/99-summary.txt"
