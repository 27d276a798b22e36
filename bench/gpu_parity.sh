#!/usr/bin/env bash
# bench/parity.py on a 2-GPU host (issue 28's kind, nvidia-h200-x2): each layout against one GPU
# on the 1.1B shape (losses of 20 steps, tokens/s per GPU), then TP 2 and PP 2 against DP 2 (with
# and without overlapping its gradient reduction) on the 3B shape. Carry .whl/py
# (bench/gpu_stories.sh makes the dataset). Logs under $OUT.
#   bash bench/gpu_parity.sh
set -euo pipefail
source bench/gpu_stories.sh
log=${OUT:-/tmp}/parity.log
python3 -m bench.parity --dataset "$W/ds/stories_text_document" --shape tinyllama-1.1b \
    2>&1 | tee -a "$log"
python3 -m bench.parity --dataset "$W/ds/stories_text_document" --shape llama-3.2-3b \
    --iters 10 --layouts one ddp2 ddp2-no-overlap fsdp2 tp2 pp2 2>&1 | tee -a "$log"
