#!/usr/bin/env bash
# Training-step throughput on one GPU against the yardstick (bench/yardstick.py) and HF, with
# and without float8, one shape after another in one run (bench/train_step.py); then float8's
# 300-step loss curve beside bf16-master's (bench/loss_curve.py) on real text that it reads once
# (300 × 4,096 tokens of .whl/bench/text.jsonl's ~2.0M). Carry .whl/py (torchao is among its
# wheels) and .whl/bench (the corpora and tokenizer: `bash bench/gpu_generate.sh wheels`). Logs
# under $OUT.
#   bash bench/gpu_perf.sh steps [SHAPE ...]     (default: tinyllama-1.1b llama-3.2-3b)
#   bash bench/gpu_perf.sh curve [SHAPE [RUN ...]]   (default: llama-3.2-3b; more runs, e.g.
#                                                    optimised-master-float8-rowwise)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD"
log=${OUT:-/tmp}/perf.log
case "$1" in
steps)
    shift
    shapes=("$@")
    [ ${#shapes[@]} -gt 0 ] || shapes=(tinyllama-1.1b llama-3.2-3b)
    for shape in "${shapes[@]}"; do
        case "$shape" in tinyllama-1.1b) mb=4 ;; llama-3-8b) mb=1 ;; *) mb=2 ;; esac
        python3 -m bench.train_step --shape "$shape" --seq 4096 --micro-batch "$mb" \
            --impl hf yardstick ours --numerics autocast master --compile block \
            --float8 off tensorwise rowwise 2>&1 | tee -a "$log"
    done ;;
curve)
    # each run's metrics are copied to $OUT when it stops, finished or not (a 3B run with its
    # final checkpoint takes ~3 minutes; `bench.loss_curve --replay DIR` reports them)
    timeout "${CURVE_LIMIT_S:-540}" python3 -u -m bench.loss_curve --corpus .whl/bench/text.jsonl \
        --tokenizer .whl/bench/tokenizer/tokenizer.model --shape "${2:-llama-3.2-3b}" \
        --micro-batch 1 --iters 300 --runs optimised-master optimised-master-float8-tensorwise \
        "${@:3}" 2>&1 | tee -a "$log" || true
    for run in /tmp/lmforge-loss-curve/*/metrics.jsonl; do
        [ -f "$run" ] && cp "$run" "${OUT:-/tmp}/curve-$(basename "$(dirname "$run")").jsonl"
    done ;;
*) echo "usage: bash bench/gpu_perf.sh steps|curve [SHAPE ...]" >&2; exit 2 ;;
esac
