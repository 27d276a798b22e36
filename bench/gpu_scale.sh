#!/usr/bin/env bash
# bench/scale.py on an 8-GPU host (issue 29's kind, nvidia-h200-x8), one part a call (each fits
# the device's 10 minutes). Carry .whl/py (bench/gpu_stories.sh makes the dataset). Logs under
# $OUT.
#   bash bench/gpu_scale.sh 8b        the 8B shape at seq 8192: FSDP 8, TP 2 × FSDP 4, TP 4 × PP 2
#   bash bench/gpu_scale.sh bubbles   plain and interleaved 1F1B at PP 2 (× TP 4) and PP 8
#   bash bench/gpu_scale.sh 70b       the 70B shape, the layers every layout fits: TP 8, TP 4 × PP 2, FSDP 8
#   bash bench/gpu_scale.sh reshard   TP 4 × PP 2 saved, resharded to FSDP 8, resumed (1.1B shape)
set -euo pipefail
source bench/gpu_stories.sh
scale=(python3 -m bench.scale --dataset "$W/ds/stories_text_document")
case "$1" in
8b) args=(--shape llama-3-8b --seq 8192 --layouts fsdp8 tp2-fsdp4 tp4-pp2) ;;
bubbles) args=(--shape llama-3-8b --seq 8192 --global-batch 16
               --layouts tp4-pp2 tp4-pp2-interleaved pp8 pp8-interleaved) ;;
70b) args=(--shape llama-70b --seq 4096 --global-batch 16 --layers fit --iters 6 --layouts tp8 tp4-pp2 fsdp8) ;;
reshard) args=(--shape tinyllama-1.1b --seq 4096 --iters 20 --reshard) ;;
*) echo "usage: bash bench/gpu_scale.sh 8b|bubbles|70b|reshard" >&2; exit 2 ;;
esac
"${scale[@]}" "${args[@]}" 2>&1 | tee -a "${OUT:-/tmp}/scale-$1.log"
