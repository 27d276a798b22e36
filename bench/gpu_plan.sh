#!/usr/bin/env bash
# bench/plan_vs_measured.py on the GPU machine: the planner's predictions beside real pretrain
# runs (peak memory, tokens/s). Carry .whl/py (bench/gpu_stories.sh). Logs under $OUT.
#   bash bench/gpu_plan.sh [CONFIG ...]
set -euo pipefail
source bench/gpu_stories.sh
only=()
[ $# -gt 0 ] && only=(--only "$@")
python3 -m bench.plan_vs_measured --dataset "$W/ds/stories_text_document" "${only[@]}" 2>&1 \
    | tee -a "${OUT:-/tmp}/plan_vs_measured.log"
