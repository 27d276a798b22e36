#!/usr/bin/env bash
# Pretrain-stage runs grouped so that each group fills one device call, in the order they matter,
# each started only while the call has time left for it (a run cut off by the call's limit
# returns nothing). Carry .whl/py (bench/gpu_stories.sh). Logs under $OUT.
#   bash bench/gpu_batches.sh 8b      (H200) the 8B shape: bf16, float8, bf16-master; bench.calibrate
#   bash bench/gpu_batches.sh plan    bench/plan_vs_measured.py's rows on this card
#   bash bench/gpu_batches.sh long    the 1.1B shape at 8k, 16k and 32k tokens
#   bash bench/gpu_batches.sh float8  float8 against bf16-master at larger micro-batches (3B, 1.1B)
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv \
    | tee -a "${OUT:-/tmp}/gpu.txt"
source bench/gpu_stories.sh
limit=${CALL_LIMIT_S:-580}
# run SECONDS_IT_MAY_TAKE COMMAND...: the command, unless the call would end before it does
run() {
    local need=$1; shift
    if [ $((SECONDS + need)) -gt "$limit" ]; then echo "skipped (${SECONDS}s gone): $*"; return; fi
    "$@"
}
layouts=bench/gpu_train_layouts.sh
case "$1" in
8b)
    run 200 bash $layouts llama-3-8b selective 1 ddp 4096 8 --precision bf16
    run 130 bash $layouts llama-3-8b selective 1 ddp 4096 8 --precision bf16 \
        --float8.recipe tensorwise
    run 130 bash $layouts llama-3-8b full 8 ddp 4096 8 --precision bf16-master
    run 90 python3 -m bench.calibrate | tee "${OUT:-/tmp}/calibrate.json" ;;
plan)
    for config in 8b-4k-selective-mb1-bf16-compiled 8b-4k-full-mb1-fsdp-compiled \
            1.1b-2k-selective-mb8 3b-2k-selective-mb2 1.1b-8k-selective-mb1 3b-8k-full-mb1 \
            1.1b-4k-selective-mb4-compiled 3b-4k-full-mb4-compiled 1.1b-2k-none-mb4; do
        run 90 bash bench/gpu_plan.sh "$config"
    done ;;
float8)
    for shape in "llama-3.2-3b full 4" "tinyllama-1.1b selective 8"; do
        set -- $shape
        for flags in "" "--float8.recipe tensorwise" \
                "--float8.recipe tensorwise --float8.bf16-blocks 0"; do
            run 80 bash $layouts "$1" "$2" "$3" ddp 4096 "$3" $flags
        done
    done ;;
long)
    for seq in 8192 16384 32768; do
        for recompute in full selective; do
            run 80 bash $layouts tinyllama-1.1b $recompute 1 ddp $seq
        done
    done ;;
*) echo "usage: bash bench/gpu_batches.sh 8b|plan|long|float8" >&2; exit 2 ;;
esac
