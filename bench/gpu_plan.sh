#!/usr/bin/env bash
# bench/plan_vs_measured.py on the GPU machine: the planner's predictions beside real pretrain
# runs (peak memory, tokens/s). The image lacks pydantic: carry .whl/py
# (`bash bench/gpu_generate.sh wheels`). Logs under $OUT.
#   bash bench/gpu_plan.sh [CONFIG ...]
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD"
W=/tmp/lmforge-plan
if [ ! -d "$W/ds" ]; then
    python3 -m engine generate-corpus --output "$W/corpus" --documents 20000 --shards 4 >/dev/null
    python3 -m engine train-tokenizer --input "$W/corpus" --output "$W/tok" --vocab-size 512 >/dev/null
    python3 -m engine tokenize --input "$W/corpus" --output-prefix "$W/ds/stories" \
        --tokenizer "$W/tok/tokenizer.model" --append-eod --workers 8 --no-progress >/dev/null
fi
only=()
[ $# -gt 0 ] && only=(--only "$@")
python3 -m bench.plan_vs_measured --dataset "$W/ds/stories_text_document" "${only[@]}" 2>&1 \
    | tee -a "${OUT:-/tmp}/plan_vs_measured.log"
